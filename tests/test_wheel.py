"""A wheel that works without a checkout, and what makes it work.

Fast: recipes by name or path, ZeRO configs independent of the working directory, the lazy public API, no
sys.path patches in bench/ and scripts/. Slow (one end-to-end test, about a minute): build the wheel, install
it (not editable) into a fresh virtual environment, and from a temporary folder (no checkout on sys.path,
offline) run `mllm demo --quick` and `mllm train --recipe clip-tiny` there.

The fresh environment takes its dependencies (torch, transformers, ...) from this interpreter's
site-packages through a `.pth` line instead of installing them again (gigabytes, and a package index);
Python does not run the `.pth` files of a folder added that way, so this checkout's editable install stays
out of it, and the wheel's own `mllm` comes first on sys.path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mllm.config import (
    RECIPES_DIR,
    ZERO_DIR,
    ConfigError,
    find_recipe,
    load_recipe,
    recipe_names,
    resolve_zero_config,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ recipes by name
def test_recipes_and_zero_configs_are_package_data():
    assert (RECIPES_DIR / "clip-tiny.yaml").is_file() and (ZERO_DIR / "zero2.json").is_file()
    assert RECIPES_DIR.parent == ZERO_DIR.parent == Path(__import__("mllm").__file__).parent
    # the checkout's old paths are links to the package folders, so docs and shell scripts keep working
    assert (REPO / "train" / "recipes").resolve() == RECIPES_DIR
    assert (REPO / "train" / "ds").resolve() == ZERO_DIR
    assert {"clip-tiny", "tiny-geoworld", "clip-resnet-tiny", "llava15-7b"} <= set(recipe_names())
    # the published configs `mllm train --dry-run` plans the GPU recipes from (mllm.planning.configs)
    models = RECIPES_DIR.parent / "model_configs"
    assert (models / "vicuna-7b-v1.5.json").is_file()
    assert (models / "clip-vit-large-patch14-336.json").is_file()


def test_recipe_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the checkout
    assert find_recipe("clip-tiny") == RECIPES_DIR / "clip-tiny.yaml"
    assert find_recipe("clip-tiny.yaml") == RECIPES_DIR / "clip-tiny.yaml"
    assert (
        find_recipe("train/recipes/clip-tiny.yaml") == RECIPES_DIR / "clip-tiny.yaml"
    )  # as the docs spell it
    assert load_recipe("clip-tiny", ["stages.contrastive.max_steps=3"]).stages[0].max_steps == 3
    own = tmp_path / "mine.yaml"
    own.write_text((RECIPES_DIR / "clip-tiny.yaml").read_text().replace("name: clip-tiny", "name: mine"))
    assert load_recipe(own).name == "mine" and load_recipe("mine.yaml").name == "mine"
    (tmp_path / "clip-tiny.yaml").write_text(own.read_text())  # an existing file wins over a packaged name
    assert load_recipe("clip-tiny.yaml").name == "mine" and load_recipe("clip-tiny").name == "clip-tiny"


def test_unknown_recipe_is_one_line_listing_the_known_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_recipe("clip-tiyn")
    msg = str(e.value)
    assert "\n" not in msg and "'clip-tiyn'" in msg and "clip-tiny" in msg and "tiny-geoworld" in msg
    with pytest.raises(ConfigError, match="cannot read recipe"):  # a missing path is still a missing path
        load_recipe("nowhere/r.yaml")
    from mllm.cli import main

    assert main(["train", "--recipe", "clip-tiyn", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mllm train: error: unknown recipe 'clip-tiyn'") and "\n" not in err


def test_zero_config_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    zero2 = str(ZERO_DIR / "zero2.json")
    from mllm.config import EngineConfig

    assert resolve_zero_config(EngineConfig().zero_config) == zero2  # the default
    assert resolve_zero_config("train/ds/zero2.json") == resolve_zero_config("zero2") == zero2
    assert resolve_zero_config("zero3_offload.json") == str(ZERO_DIR / "zero3_offload.json")
    assert resolve_zero_config(None) is None
    mine = tmp_path / "zero2.json"
    mine.write_text("{}")
    assert resolve_zero_config(str(mine)) == str(mine)  # any other path is a path
    assert resolve_zero_config("zero2.json") == "zero2.json"  # a file where the run starts wins over the name
    # every ZeRO config a packaged recipe names resolves to a packaged file
    for name in recipe_names():
        for value in re.findall(r"zero_config:\s*([^\s,}]+)", (RECIPES_DIR / f"{name}.yaml").read_text()):
            if value != "null":
                assert Path(resolve_zero_config(value)).is_file(), (name, value)
    from mllm.training.engine import load_ds_config

    stage = load_recipe("clip-tiny").stages[0]
    assert load_ds_config("train/ds/zero3.json", stage, "fp32")["zero_optimization"]["stage"] == 3


# ------------------------------------------------------------------------------------------ public API
def test_import_mllm_is_cheap_and_offers_the_public_api():
    code = (
        "import sys, mllm; assert 'torch' not in sys.modules, 'import mllm pulled in torch'; "
        "assert set(mllm.__all__) == {'load_model', 'load_recipe', 'train', 'MultimodalLM'}; "
        "from mllm.model import MultimodalLM; from mllm.training.runner import train_recipe; "
        "from mllm.config import load_recipe; "
        "assert mllm.MultimodalLM is MultimodalLM and mllm.train is train_recipe and mllm.load_recipe is load_recipe; "
        "assert callable(mllm.load_model); "
        "assert not hasattr(mllm, 'no_such_name')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_load_model_finds_the_kind_of_a_model_or_run_folder(tiny_model, tmp_path):
    import mllm

    folder = tmp_path / "run" / "instruct" / "final"
    tiny_model.save_pretrained(folder)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"final": str(folder)}))
    for where, kind in ((folder, None), (tmp_path / "run", None), (tmp_path / "run", "mllm")):
        assert isinstance(mllm.load_model(where, kind), mllm.MultimodalLM)
    with pytest.raises(FileNotFoundError, match="neither"):
        mllm.load_model(tmp_path)


def test_bench_and_scripts_do_not_patch_sys_path():
    offenders = []
    for path in sorted([*(REPO / "bench").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"sys\.path\.(insert|append|extend)|PYTHONPATH", code):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "import the installed package instead:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------------------ the wheel, installed
def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (
        f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    )
    return r


def _source_copy(dst: Path) -> Path:
    """What a build reads (pyproject, README, LICENSE, the packages), copied so the build leaves no build/ or
    egg-info in the checkout. Skipped: hidden folders, run outputs, earlier builds."""
    skip = {"runs", "build", "dist", "tests", "docs"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO
        return {
            n
            for n in names
            if n == "__pycache__" or n.endswith(".egg-info") or (top and (n.startswith(".") or n in skip))
        }

    shutil.copytree(REPO, dst, symlinks=True, ignore=ignore)
    return dst


@pytest.mark.slow
def test_wheel_installs_and_runs_without_a_checkout(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.fail(
            f"setuptools {setuptools.__version__} cannot build this pyproject (needs >= 77, the `dev` extra "
            "installs it): pip install -e '.[dev]'"
        )
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "PYTHONPATH",
            "VIRTUAL_ENV",
            "MLLM_FAULT",
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        )
    }
    env.update(
        HF_HUB_OFFLINE="1",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    work = tmp_path / "work"  # the working directory of every command: no checkout in it or above it
    work.mkdir()

    # 1. build the wheel offline, with this environment's setuptools
    src = _source_copy(tmp_path / "src")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        work,
        env,
    )
    (wheel,) = (tmp_path / "dist").glob("mllm-*.whl")

    # 2. a fresh virtual environment with the wheel installed (a copy, not editable), then the dependencies
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, env)
    py = venv / "bin" / "python"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        work,
        env,
    )
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env
        ).stdout.strip()
    )
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_mllm_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    where = json.loads(
        _run(
            [
                str(py),
                "-c",
                (
                    "import json, sys, mllm, encoders; from mllm.config import RECIPES_DIR, resolve_zero_config; "
                    "print(json.dumps({'mllm': mllm.__file__, 'encoders': encoders.__file__, 'path': sys.path, "
                    "'recipes': str(RECIPES_DIR), 'zero': resolve_zero_config('train/ds/zero2.json')}))"
                ),
            ],
            work,
            env,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    for key in ("mllm", "encoders", "recipes", "zero"):
        assert Path(where[key]).is_relative_to(site), (key, where[key])
    assert Path(where["zero"]).is_file() and (Path(where["recipes"]) / "clip-tiny.yaml").is_file()
    assert not [p for p in where["path"] if p and Path(p).resolve() in (REPO, REPO / "mllm")], where["path"]

    # 3. the demo, with its recipes from the installed package
    mllm = str(venv / "bin" / "mllm")
    _run([mllm, "demo", "--quick", "--out", "demo"], work, env)
    res = json.loads((work / "demo" / "results.json").read_text())
    assert "qa_accuracy" in res and (work / "demo" / "curves.png").is_file()
    assert (work / "demo" / "run" / "run.json").is_file() and (
        work / "demo" / "encoder" / "run.json"
    ).is_file()

    # 4. a packaged recipe by name, on a small world, shortened
    _run([mllm, "synth", "--out", "world", "--n", "32"], work, env)
    r = _run(
        [
            mllm,
            "train",
            "--recipe",
            "clip-tiny",
            "--out",
            "clip",
            "extra.world=world",
            "stages.contrastive.max_steps=2",
            "stages.contrastive.batch_size=8",
            "engine.checkpoint_every=0",
        ],
        work,
        env,
    )
    assert "model: clip/contrastive/final" in r.stdout
    run = json.loads((work / "clip" / "run.json").read_text())
    assert run["final"] and (work / "clip" / "recipe.yaml").is_file()
    assert (work / "clip" / "contrastive" / "final" / "image_tower").is_dir()
    # and the public API loads what it wrote
    r = _run([str(py), "-c", "import mllm; print(type(mllm.load_model('clip')).__name__)"], work, env)
    assert r.stdout.strip().splitlines()[-1] == "ContrastiveModel"

    # 5. a GPU recipe planned from the installed package's shipped configs (no weights, no checkout)
    r = _run([mllm, "train", "--recipe", "llava15-7b", "--dry-run", "--json", "--stage", "align"], work, env)
    plan = json.loads(r.stdout)
    assert {p["origin"] for p in plan["parts"]} == {"shipped"} and plan["stages"][0]["image_tokens"] == 576
