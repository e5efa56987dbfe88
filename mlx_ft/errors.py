"""The few exception types mlx_ft raises for user mistakes.

Each message names the place (file:line, recipe key path, record index), what was expected,
what was found, and the fix. The CLI prints them as one line (or one block) and exits with 2.
"""


class MlxFtError(Exception):
    """Base class for every error caused by user input, never by a bug in mlx_ft."""


class RecipeError(MlxFtError):
    """A recipe file has one or more problems; all of them are listed together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class DataError(MlxFtError):
    """A dataset file or record cannot be used (names file:line and the fix)."""


class ModelError(MlxFtError):
    """The model cannot be loaded or adapted as the recipe asks."""


class CheckpointError(MlxFtError):
    """A run directory or checkpoint cannot be used for this recipe."""


class TrainingError(MlxFtError):
    """Training had to stop (NaN loss, memory budget reached); the message says where and why."""


class ExportError(MlxFtError):
    """A fuse or export step cannot be carried out as asked."""


class PlanError(MlxFtError):
    """The planner lacks what it needs (unknown machine, model config not found offline)."""


class StorageError(MlxFtError):
    """A file or directory cannot be written or replaced (disk full, read-only, not mlx_ft's to
    replace, in use by another run); the message names the path and what was kept."""

    def __init__(self, message: str, path=None, reason: str | None = None):
        super().__init__(message)
        self.path, self.reason = path, reason  # set for a write that failed


class MlxFtWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one line)."""
