"""The README's first command runs examples/demo.py: it must keep working and keep telling the truth."""
from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_rewrites_pretrained_minilm_and_preserves_embeddings(capsys):
    assert _demo().main(["--variant", "mhc", "--variant", "frac"]) == 0
    out = capsys.readouterr().out
    assert out.count("12 rewritten, 0 refused") == 2  # 6 layers x (attention + MLP)
    assert "function preserved at init" in out and ": yes" in out
    assert "post-norm" in out


def test_readme_opens_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    head = text[: text.index("## Use")]
    assert "examples/demo.py" in head
    marker = head.index("<!-- test-command -->")
    assert "pytest" in head[marker:]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci  # .ci/run runs exactly the README's test command


def test_readme_llama_example_runs(tmp_path, monkeypatch):
    """The README's "Generate with a rewritten Llama, save and reload it" block, executed as written."""
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- readme-example:llama -->")
    block = text[text.index("```python", start) + len("```python"):text.index("```", text.index("```python", start) + 9)]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "llama-mhc" / "config.json").exists()
