"""The lmms-eval model class, against lmms-eval's real base class where it imports, else a shim.

lmms-eval's full install needs torchvision (which this CPU machine cannot take beside torch 2.13 CPU);
its `lmms_eval.api.model`, `lmms_eval.api.instance` and model registry import with `pip install
lmms-eval --no-deps` plus `pytz` and `loguru`. Where even that is missing (CI), the shim below mirrors
the documented interface (abstract `loglikelihood`, `generate_until`, `generate_until_multi_round`;
`Instance(request_type, arguments, idx, metadata)` with `.args`; `task_dict`), so the adapter's
behaviour is tested either way.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from mllm.inference import answer_batch

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
if HAVE_LMMS:
    try:
        import lmms_eval.api.model  # noqa: F401
    except Exception:  # noqa: BLE001 - installed without the deps its base class imports
        HAVE_LMMS = False


def _shim_modules() -> dict[str, types.ModuleType]:
    """lmms_eval.api.model.lmms / lmms_eval.api.instance.Instance / registry_v2.ModelManifest, as documented."""

    class lmms(abc.ABC):  # noqa: N801 - lmms-eval's name
        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    @dataclass
    class Instance:
        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = field(default_factory=dict)

        @property
        def args(self):
            return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None

    mods = {
        name: types.ModuleType(name)
        for name in (
            "lmms_eval",
            "lmms_eval.api",
            "lmms_eval.api.model",
            "lmms_eval.api.instance",
            "lmms_eval.models",
            "lmms_eval.models.registry_v2",
        )
    }
    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.api.instance"].Instance = Instance
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    return mods


@pytest.fixture(params=["lmms_eval", "shim"])
def api(request, monkeypatch):
    if request.param == "lmms_eval" and not HAVE_LMMS:
        pytest.skip(
            "lmms-eval's base class does not import here (pip install lmms-eval --no-deps pytz loguru)"
        )
    if request.param == "shim":
        for name, mod in _shim_modules().items():
            monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "mllm.integrations.lmms_eval", raising=False)
    adapter = importlib.import_module("mllm.integrations.lmms_eval")
    base = importlib.import_module("lmms_eval.api.model").lmms
    instance = importlib.import_module("lmms_eval.api.instance").Instance
    yield adapter, base, instance
    sys.modules.pop("mllm.integrations.lmms_eval", None)


@pytest.fixture()
def saved(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


DOCS = [
    {"image": Image.new("RGB", (40, 40), (200, 30, 30)), "q": "What color is the circle?"},
    {"image": Image.new("RGB", (50, 30), (30, 30, 200)), "q": "How many shapes are there?"},
]


def _make(adapter, saved, **kw):
    model = adapter.MllmLMMS(pretrained=str(saved), max_new_tokens=8, **kw)
    model.task_dict = {"geo": {"test": DOCS}}
    return model


def _inst(Instance, kind, args, i):
    return Instance(
        request_type=kind, arguments=args, idx=i, metadata={"task": "geo", "doc_id": i, "repeats": 1}
    )


def test_is_an_lmms_model_and_registers_under_mllm(api, saved):
    adapter, base, _ = api
    assert issubclass(adapter.MllmLMMS, base) and adapter.MllmLMMS.is_simple
    assert not getattr(adapter.MllmLMMS, "__abstractmethods__", None)  # every abstract method implemented
    m = adapter.manifest()
    assert m.model_id == "mllm" and m.simple_class_path == "mllm.integrations.lmms_eval.MllmLMMS"
    if "registry_v2" in str(getattr(sys.modules["lmms_eval.models.registry_v2"], "__file__", "")):
        from importlib.metadata import entry_points

        if any(
            ep.name == "mllm" for ep in entry_points(group="lmms_eval.models")
        ):  # installed with its metadata
            from lmms_eval.models import get_model

            assert get_model("mllm").__qualname__ == "MllmLMMS"  # `lmms-eval --model mllm` resolves to it
    with pytest.raises(ValueError, match="unknown model_args"):
        adapter.MllmLMMS(pretrained=str(saved), temprature=0)


def test_generate_until_matches_mllm_greedy_answers(api, saved):
    adapter, _, Instance = api
    model = _make(adapter, saved)
    reqs = [
        _inst(
            Instance,
            "generate_until",
            (d["q"], {"until": ["\n\n"], "max_new_tokens": 8}, lambda doc: [doc["image"]], i, "geo", "test"),
            i,
        )
        for i, d in enumerate(DOCS)
    ]
    got = model.generate_until(reqs)
    want = answer_batch(model.model, [d["q"] for d in DOCS], [d["image"] for d in DOCS], max_new_tokens=8)
    assert got == want and all(isinstance(g, str) for g in got)


def test_loglikelihood_is_the_continuation_log_probability(api, saved):
    adapter, _, Instance = api
    model = _make(adapter, saved)
    greedy = model.generate_until(
        [
            _inst(
                Instance,
                "generate_until",
                (DOCS[0]["q"], {"max_new_tokens": 3}, lambda d: [d["image"]], 0, "geo", "test"),
                0,
            )
        ]
    )[0]
    reqs = [
        _inst(Instance, "loglikelihood", (DOCS[0]["q"], cont, lambda d: [d["image"]], 0, "geo", "test"), i)
        for i, cont in enumerate([greedy, " zebra zebra"])
    ]
    (lp_greedy, is_greedy), (lp_other, other_greedy) = model.loglikelihood(reqs)
    assert is_greedy and not other_greedy and lp_greedy > lp_other and lp_greedy < 0
    # the same number by hand: full-sequence logits, log-softmax, the continuation's tokens
    from mllm.inference import prompt_ids

    tok = model.model.tokenizer
    prompt = prompt_ids(model.model, [("user", "<image>\n" + DOCS[0]["q"])], 1)
    cont = tok(" zebra zebra", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids = torch.cat([prompt, cont])[None]
    with torch.no_grad():
        logits = model.model(ids, torch.ones_like(ids), model.model.preprocess([DOCS[0]["image"]])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)[len(prompt) - 1 : -1].gather(-1, cont[:, None]).sum()
    assert lp_other == pytest.approx(float(lp), rel=1e-5)


def test_generate_until_multi_round_follows_doc_to_text(api, saved):
    adapter, _, Instance = api
    model = _make(adapter, saved)
    seen = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append((round_idx, list(previous_output), previous_round_info))
        done = round_idx >= 2
        return None, "And the shape?", done, list(previous_output), {"round": round_idx}

    req = _inst(
        Instance,
        "generate_until_multi_round",
        (DOCS[0]["q"], {"max_new_tokens": 4}, lambda d: [d["image"]], doc_to_text, 0, "geo", "test"),
        0,
    )
    (rounds,) = model.generate_until_multi_round([req])
    assert [r for r, _, _ in seen] == [1, 2]
    assert len(rounds) == 2 and seen[1][1] == rounds and seen[1][2] == {"round": 1}
    assert (
        rounds[0]
        == model.generate_until(
            [
                _inst(
                    Instance,
                    "generate_until",
                    (DOCS[0]["q"], {"max_new_tokens": 4}, lambda d: [d["image"]], 0, "geo", "test"),
                    0,
                )
            ]
        )[0]
    )
