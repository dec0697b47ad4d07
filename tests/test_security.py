"""Security: weights only from safetensors, no pickle or eval on any input (refer's RefCOCO pickle is
read by one unpickler that loads no global), `trust_remote_code` off unless the recipe turns it on,
image paths confined to the root (symlinks too), the pixel limit, and a chat CLI that treats whatever
it is given as text."""

from __future__ import annotations

import ast
import builtins
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from mllm.cli import main as cli_main
from mllm.config import recipe_from_dict
from mllm.data.images import ImageError, load_image, resolve_image
from mllm.model import build_lm
from mllm.training.runner import build_model

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("mllm", "encoders") for p in (REPO / d).rglob("*.py"))
# The one module allowed to import pickle: an Unpickler subclass that resolves no global (refer's refs.p).
PLAIN_PICKLE = Path("mllm/evaluation/benchmarks/plain_pickle.py")
# Receivers of `.from_pretrained(..., local_files_only=True)` that read no weights.
NO_WEIGHTS = re.compile(r"Config|config|Tokenizer|tokenizer|Processor|processor")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else ast.unparse(k.value)
    return None


def test_source_audit():
    """Every torch.load is weights_only=True; no pickle, eval/exec, yaml.load, shell=True; every weight
    load through transformers passes use_safetensors=True."""
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                pickles = [
                    n
                    for n in names
                    if n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal")
                ]
                if pickles and not (rel == PLAIN_PICKLE and pickles == ["pickle"]):
                    problems.append(f"{rel}:{node.lineno}: imports a pickle module")
        for call, func in _calls(tree):
            where = f"{rel}:{call.lineno}: {func}"
            if func in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                problems.append(f"{where}: only plain_pickle's no-globals Unpickler reads pickles")
            if func == "torch.load" and _kw(call, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
            if func in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
                problems.append(f"{where} evaluates code")
            if func == "yaml.load" or func == "yaml.unsafe_load":
                problems.append(f"{where}: use yaml.safe_load")
            if _kw(call, "shell") is True:
                problems.append(f"{where} with shell=True")
            if func == "os.system" or func.startswith("os.popen"):
                problems.append(f"{where} runs a shell")
            if func.endswith(".from_pretrained") and _kw(call, "local_files_only") is not None:
                receiver = func.rsplit(".", 1)[0]
                if not NO_WEIGHTS.search(receiver) and _kw(call, "use_safetensors") is not True:
                    problems.append(f"{where} loads weights without use_safetensors=True")
    assert not problems, "\n".join(problems)
    assert len(SOURCES) > 30  # the scan saw the tree


def test_the_one_unpickler_resolves_no_global(tmp_path):
    """plain_pickle subclasses pickle.Unpickler with a find_class that refuses every global, so a pickle
    that would run code is refused before anything runs, with one line naming the file; plain data
    (what refer's refs(unc).p holds, as Python 2 wrote it) loads."""
    import pickle

    from mllm.evaluation.benchmarks.plain_pickle import PlainPickleError, _PlainUnpickler, load_plain

    tree = ast.parse((REPO / PLAIN_PICKLE).read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_PlainUnpickler")
    assert [ast.unparse(b) for b in cls.bases] == ["pickle.Unpickler"]
    find_class = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "find_class")
    assert any(isinstance(n, ast.Raise) for n in ast.walk(find_class))
    with pytest.raises(pickle.UnpicklingError):
        _PlainUnpickler(__import__("io").BytesIO(b"")).find_class("os", "system")

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        bad = tmp_path / f"refs(unc).{protocol}.p"
        bad.write_bytes(pickle.dumps(Evil(), protocol=protocol))
        with pytest.raises(PlainPickleError) as err:
            load_plain(bad)
        assert str(bad) in str(err.value) and "posix.mkdir" in str(err.value) and "\n" not in str(err.value)
        assert not marker.exists()
    # Python 2's protocol 0, as refer wrote refs(unc).p: str ('S') and unicode ('V') strings, lists, dicts
    py2 = tmp_path / "refs(unc).p"
    py2.write_bytes(
        b"(lp0\n(dp1\nS'split'\np2\nS'val'\np3\nsS'sentences'\np4\n(lp5\n(dp6\nVsent\np7\nVthe man\np8\nsasa."
    )
    assert load_plain(py2) == [{"split": "val", "sentences": [{"sent": "the man"}]}]


def test_pickled_weights_are_refused(tmp_path):
    """An LM folder with only pytorch_model.bin (a pickle) is not loaded: safetensors or nothing."""
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    lm = AutoModelForCausalLM.from_config(cfg)
    cfg.save_pretrained(tmp_path)
    torch.save(lm.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        build_lm(str(tmp_path), {}, 64)
    lm.save_pretrained(tmp_path / "st")  # the same weights as safetensors load
    assert build_lm(str(tmp_path / "st"), {}, 64).get_input_embeddings().num_embeddings == 64


class _Recorder:
    """Stands in for a transformers Auto class: records the kwargs, then does the real load."""

    def __init__(self, real, seen: list):
        self.real, self.seen = real, seen

    def from_pretrained(self, *args, **kwargs):
        self.seen.append((self.real.__name__, kwargs.get("trust_remote_code", "absent")))
        return self.real.from_pretrained(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("flag", [None, True])
def test_trust_remote_code_reaches_from_pretrained_only_when_the_recipe_says(
    tokenizer, tmp_path, monkeypatch, flag
):
    import encoders.common
    import mllm.model

    lm_dir, tok_dir = tmp_path / "lm", tmp_path / "tok"
    build_lm(
        None,
        dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        len(tokenizer),
    ).save_pretrained(lm_dir)
    tokenizer.save_pretrained(str(tok_dir))
    seen: list = []
    monkeypatch.setattr(mllm.model, "AutoModelForCausalLM", _Recorder(mllm.model.AutoModelForCausalLM, seen))
    # load_tokenizer lives in encoders.common (mllm.tokenizer re-exports it): patch where it looks the class up
    monkeypatch.setattr(encoders.common, "AutoTokenizer", _Recorder(encoders.common.AutoTokenizer, seen))
    lm = {"path": str(lm_dir)} | ({"trust_remote_code": flag} if flag is not None else {})
    recipe = recipe_from_dict(
        {
            "name": "t",
            "model": {
                "tower": {
                    "type": "clip",
                    "select_layer": -1,
                    "config": dict(
                        image_size=32,
                        patch_size=8,
                        hidden_size=32,
                        intermediate_size=64,
                        num_hidden_layers=1,
                        num_attention_heads=2,
                    ),
                },
                "lm": lm,
                "tokenizer": {"path": str(tok_dir)},
            },
        }
    )
    build_model(recipe.model, tmp_path / "run", [], seed=0)
    assert {name for name, _ in seen} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(v is bool(flag) for _, v in seen), seen


def test_image_paths_confined_to_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "x.png")
    Image.new("RGB", (4, 4)).save(root / "sub" / "in.png")
    os.symlink(outside, root / "linkdir")  # a symlinked folder out of the root
    os.symlink(root / "sub" / "in.png", root / "inside_link.png")  # a symlink that stays inside
    for bad in (
        "../outside/x.png",
        str(outside / "x.png"),
        "linkdir/x.png",
        "sub/../../outside/x.png",
        "/etc/passwd",
        "../../../../../../etc/passwd",
    ):
        with pytest.raises(ImageError, match="escapes the image root"):
            resolve_image(root, bad)
    for good in ("sub/in.png", "sub/../sub/in.png", "inside_link.png", "./sub/in.png"):
        assert load_image(resolve_image(root, good)).size == (4, 4)


def test_pixel_limit(tmp_path):
    Image.new("L", (300, 200)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", max_pixels=60_000).size == (300, 200)
    with pytest.raises(ImageError, match="300x200 = 60000 pixels exceeds the limit of 59999"):
        load_image(tmp_path / "a.png", max_pixels=59_999)


PAYLOADS = [
    "__import__('os').system('touch {marker}')",
    "exec(\"open('{marker}', 'w').write('x')\")",
    "$(touch {marker})",
    "; touch {marker} #",
    "{{{{7*7}}}} {{__import__('os').system('touch {marker}')}}",
    "!!python/object/apply:os.system ['touch {marker}']",
]


def test_chat_cli_treats_input_as_text(tiny_model, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    marker = tmp_path / "PWNED"
    payloads = [p.format(marker=marker) for p in PAYLOADS]
    # For real, once each way: nothing is executed.
    assert (
        cli_main(["chat", "--model", str(model_dir), "--prompt", payloads[0], "--max-new-tokens", "4"]) == 0
    )
    lines = iter(payloads[1:] + ["/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert cli_main(["chat", "--model", str(model_dir), "--max-new-tokens", "4"]) == 0
    assert not marker.exists()
    # And what reaches the model is exactly the text typed, as the user turn of the conversation.
    import mllm.inference

    asked: list[str] = []
    real_ask = mllm.inference.ChatSession.ask

    def ask(self, text, *a, **k):
        asked.append(text)
        return real_ask(self, text, *a, **k)

    monkeypatch.setattr(mllm.inference.ChatSession, "ask", ask)
    lines = iter(payloads + ["/quit"])
    assert cli_main(["chat", "--model", str(model_dir), "--max-new-tokens", "2"]) == 0
    assert asked == payloads
    assert not marker.exists()
    capsys.readouterr()
