"""encoders.registry.Registry: every registry in the code base is one; duplicates are refused naming both
places, unknown names list the known ones, pattern entries stand for families of names."""

from __future__ import annotations

import pytest

from encoders.registry import DuplicateName, Registry, UnknownName


def test_register_and_look_up() -> None:
    reg: Registry[int] = Registry("widget")
    assert reg.register("one", 1) == 1

    @reg.register("two")
    def two() -> int:
        return 2

    assert reg["one"] == 1 and reg["two"] is two
    assert list(reg) == ["one", "two"] and len(reg) == 2 and "one" in reg and "three" not in reg
    assert reg.get("three") is None  # a Mapping: `get` and `except KeyError` still work
    assert reg.where("one").startswith(f"{__file__}:")


def test_duplicate_names_both_places() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("one", 1)
    first_line = test_duplicate_names_both_places.__code__.co_firstlineno + 2
    with pytest.raises(DuplicateName) as err:
        reg.register("one", 2)
    msg = str(err.value)
    assert "widget 'one' is already registered at" in msg
    assert f"{__file__}:{first_line} ({__name__})" in msg  # the first registration
    assert f"{__file__}:{first_line + 3} ({__name__})" in msg  # and the second one
    assert reg["one"] == 1  # refused, not overwritten
    assert isinstance(err.value, ValueError)
    reg.register("one", 3, replace=True)  # unless a replacement is meant
    assert reg["one"] == 3


def test_helper_records_its_callers_place() -> None:
    """A helper wrapping `register` passes stacklevel=2, so the place named is its caller's."""
    reg: Registry[int] = Registry("widget")

    def register_widget(name: str, value: int) -> int:
        return reg.register(name, value, stacklevel=2)

    line = test_helper_records_its_callers_place.__code__.co_firstlineno + 8
    register_widget("w", 1)
    assert reg.where("w") == f"{__file__}:{line} ({__name__})"
    with pytest.raises(DuplicateName, match=f"registered again at .*:{line + 3} "):
        register_widget("w", 2)


def test_unknown_name_lists_known_names() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("b", 2)
    reg.register("a", 1)
    with pytest.raises(UnknownName, match=r"unknown widget 'c'; known: a, b$") as err:
        reg["c"]
    assert isinstance(err.value, ValueError) and isinstance(err.value, KeyError)
    with pytest.raises(KeyError):
        reg.unregister("c")
    assert reg.unregister("a") == 1 and list(reg) == ["b"]


def test_patterns() -> None:
    reg: Registry[str] = Registry("layout")
    reg.register("flat", "flat")
    reg.register_pattern(r"deep(\d+)", "deep{N}", lambda m: f"deep x{int(m.group(1))}")
    assert reg["deep3"] == "deep x3" and "deep12" in reg and "deepX" not in reg
    assert reg["flat"] == "flat" and list(reg) == ["flat"]  # iteration: the fixed names
    assert reg.known() == ["flat", "deep{N}"]
    with pytest.raises(UnknownName, match=r"known: flat, deep\{N\}"):
        reg["shallow"]
    with pytest.raises(DuplicateName, match="layout family 'deep{N}' is already registered at"):
        reg.register_pattern(r"deep(\d+)", "deep{N}", lambda m: "")


def test_every_registry_refuses_duplicates() -> None:
    """The registries of the code base are Registry instances, so all of them refuse a second entry."""
    from encoders.objectives import OBJECTIVES
    from encoders.text_tower import TEXT_TOWERS
    from encoders.towers import TOWERS
    from mllm.chat import IMAGE_PLACEMENTS, TEMPLATES
    from mllm.data.samplers import ORDERS
    from mllm.evaluation.benchmarks import BENCHMARKS
    from mllm.families import FAMILIES, STAGE_KINDS, TASKS
    from mllm.hf_export import CHAT_TEMPLATES, PROJECTOR_EXPORTS
    from mllm.logging_backends import LOGGERS
    from mllm.planning.configs import SHIPPED
    from mllm.planning.hardware import GPUS
    from mllm.planning.workload import WORKLOADS
    from mllm.projectors import PROJECTORS
    from mllm.vision import FUSIONS

    registries = [
        OBJECTIVES,
        TEXT_TOWERS,
        TOWERS,
        IMAGE_PLACEMENTS,
        TEMPLATES,
        ORDERS,
        BENCHMARKS,
        FAMILIES,
        STAGE_KINDS,
        TASKS,
        CHAT_TEMPLATES,
        PROJECTOR_EXPORTS,
        LOGGERS,
        PROJECTORS,
        FUSIONS,
        GPUS,
        WORKLOADS,
        SHIPPED,
    ]
    for reg in registries:
        assert isinstance(reg, Registry) and len(reg) > 0, reg
        name = next(iter(reg))
        with pytest.raises(DuplicateName, match=f"{name!r} is already registered at .*; registered again at"):
            reg.register(name, reg[name])


def test_stage_kind_and_task_duplicates_are_refused() -> None:
    """register_stage / register_task used to overwrite silently; a family reusing a name is refused whole."""
    from mllm.families import FAMILIES, STAGE_KINDS, TASKS, Family, StageKind, register_family

    mllm = FAMILIES["mllm"]
    clash = Family(
        "clash", mllm.build, mllm.load, lambda p: False, stages=(StageKind("align", {"projector": 1.0}),)
    )
    with pytest.raises(
        DuplicateName, match=r"stage kind 'align' is already registered at .*mllm/families/mllm.py"
    ):
        register_family(clash)
    clash = Family(
        "clash", mllm.build, mllm.load, lambda p: False, tasks={"conversation": TASKS["conversation"]}
    )
    with pytest.raises(DuplicateName, match="training task 'conversation' is already registered"):
        register_family(clash)
    assert "clash" not in FAMILIES and STAGE_KINDS["align"].trainable == {"projector": 1.0}
    with pytest.raises(ValueError, match="names task 'nope'"):
        register_family(
            Family(
                "clash",
                mllm.build,
                mllm.load,
                lambda p: False,
                stages=(StageKind("clash_stage", task="nope"),),
            )
        )
    assert "clash" not in FAMILIES and "clash_stage" not in STAGE_KINDS
