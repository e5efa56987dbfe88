"""The unified-memory budget planner: will this recipe fit this Mac, and what to change if not.

    from mlx_ft.planner import plan
    p = plan("recipes/qwen32b-qlora.toml", machine="m4-max-128")
    print(p.render())
"""

from .configs import ModelShape, load_shape
from .formula import estimate
from .machines import Machine, get_machine, list_machines
from .plan import Plan, plan, plan_model, settings_from_recipe
from .settings import Estimate, Settings

__all__ = ["Estimate", "Machine", "ModelShape", "Plan", "Settings", "estimate", "get_machine",
           "list_machines", "load_shape", "plan", "plan_model", "settings_from_recipe"]
