"""Registry unit tests over injected fake entry points."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pytest

from fedge.errors import ConfigError, DuplicatePluginError, PluginLoadError, PluginNotFoundError
from fedge.registry import Kind, Registry, plugin, plugin_info


@dataclass
class FakeEntryPoint:
    name: str
    value: str
    obj: object = None
    error: Exception | None = None
    loads: int = 0

    def load(self) -> object:
        self.loads += 1
        if self.error is not None:
            raise self.error
        return self.obj


def source_of(*entries: tuple[FakeEntryPoint, str, str]):
    def source(group: str):
        return list(entries)

    return source


@runtime_checkable
class ModelLike(Protocol):
    def build(self) -> object: ...


@plugin("model", "alpha")
class Alpha:
    """Alpha model."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        width: int = 4
        """Hidden units."""
        rate: float = 0.5
        """Dropout rate."""

        def __post_init__(self) -> None:
            if not 0 <= self.rate < 1:
                raise ValueError(f"rate must be in [0, 1), got {self.rate}")

    @staticmethod
    def build() -> object:
        return object()


@plugin("model", "beta")
class Beta:
    """Beta model."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        pass


def test_decorator_only_tags_and_returns_the_class() -> None:
    assert plugin_info(Alpha).name == "alpha"
    assert plugin_info(Alpha).kind is Kind.MODEL
    assert Alpha.__name__ == "Alpha"


@pytest.mark.parametrize("bad", ["Alpha", "1x", "with space", "", "a--b"])
def test_decorator_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ValueError, match="lowercase identifier"):
        plugin("model", bad)


def test_kinds_have_entry_point_groups() -> None:
    assert Kind.STRATEGY.group == "fedge.strategies"
    assert Kind.ANALYSIS.group == "fedge.analyses"
    assert Kind.MODEL.group == "fedge.models"


def test_names_read_metadata_only() -> None:
    a = FakeEntryPoint("alpha", "pkg:Alpha", Alpha)
    b = FakeEntryPoint("beta", "pkg:Beta", Beta)
    reg: Registry[type] = Registry("model", source=source_of((b, "dist-b", "1.0"), (a, "dist-a", "2.0")), env={})

    assert reg.names() == ["alpha", "beta"]
    assert a.loads == b.loads == 0
    assert reg.get("alpha") is Alpha
    assert (a.loads, b.loads) == (1, 0)
    reg.get("alpha")
    assert a.loads == 1  # cached
    assert [s.distribution for s in reg.specs()] == ["dist-a", "dist-b"]


def test_unknown_name_lists_valid_ones() -> None:
    reg: Registry[type] = Registry(
        "model", source=source_of((FakeEntryPoint("alpha", "p:A", Alpha), "d", "1")), env={}
    )
    with pytest.raises(PluginNotFoundError, match="unknown model 'gamma'; valid: alpha"):
        reg.get("gamma")


def test_duplicate_names_both_distributions() -> None:
    src = source_of(
        (FakeEntryPoint("alpha", "one:A", Alpha), "dist-one", "1"),
        (FakeEntryPoint("alpha", "two:A", Alpha), "dist-two", "1"),
    )
    with pytest.raises(DuplicatePluginError) as info:
        Registry("model", source=src, env={})
    assert "dist-one" in str(info.value) and "dist-two" in str(info.value)


def test_same_distribution_twice_is_not_a_duplicate() -> None:
    ep = FakeEntryPoint("alpha", "one:A", Alpha)
    reg: Registry[type] = Registry("model", source=source_of((ep, "d", "1"), (ep, "d", "1")), env={})
    assert reg.names() == ["alpha"]


def test_missing_framework_names_the_extra() -> None:
    err = ModuleNotFoundError("No module named 'flwr'", name="flwr")
    reg: Registry[type] = Registry(
        "aggregator", source=source_of((FakeEntryPoint("fedavg", "p:F", error=err), "fedge", "1")), env={}
    )
    with pytest.raises(PluginLoadError, match=r"pip install 'fedge\[flower\]'"):
        reg.get("fedavg")


def test_load_failure_is_a_warning_and_the_rest_still_load() -> None:
    broken = FakeEntryPoint("broken", "p:B", error=RuntimeError("boom"))
    good = FakeEntryPoint("alpha", "p:A", Alpha)
    reg: Registry[type] = Registry("model", source=source_of((broken, "d", "1"), (good, "d", "1")), env={})

    with pytest.warns(RuntimeWarning, match="'broken'.*boom"):
        loaded = reg.load_all()

    assert loaded == {"alpha": Alpha}


def test_untagged_or_mismatched_object_is_a_load_error() -> None:
    reg: Registry[type] = Registry(
        "strategy", source=source_of((FakeEntryPoint("alpha", "p:A", Alpha), "d", "1")), env={}
    )
    with pytest.raises(PluginLoadError, match="@plugin"):
        reg.get("alpha")


def test_disable_autoload_keeps_fedge_and_allowed_plugins() -> None:
    src = source_of(
        (FakeEntryPoint("alpha", "p:A", Alpha), "fedge", "1"),
        (FakeEntryPoint("beta", "p:B", Beta), "third", "1"),
        (FakeEntryPoint("gamma", "p:G", Beta), "other", "1"),
    )
    assert Registry("model", source=src, env={"FEDGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).names() == ["alpha"]
    allowed = Registry("model", source=src, env={"FEDGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FEDGE_PLUGINS": "beta"})
    assert allowed.names() == ["alpha", "beta"]


def test_installed_builtins_are_found_through_entry_points() -> None:
    reg: Registry[type] = Registry(Kind.DATASET)
    assert {"digits", "npz", "csv", "image-folder"} <= set(reg.names())
    assert {s.distribution for s in reg.specs() if s.name == "digits"} == {"fedge"}
    assert {"mlp", "cnn", "tiny-gpt"} <= set(Registry(Kind.MODEL).names())


def test_import_fedge_pulls_in_no_framework() -> None:
    import subprocess

    code = (
        "import sys, fedge, fedge.cli.app; fedge.cli.app.build_app();"
        "heavy = {'torch','flwr','tensorflow','pandas','numpy'} & {m.split('.')[0] for m in sys.modules};"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_protocol_types_and_checks_the_plugin() -> None:
    # Prepare: alpha has build() and a Config; beta has a Config but no build().
    source = source_of(
        (FakeEntryPoint("alpha", "pkg:Alpha", Alpha), "dist-a", "1"),
        (FakeEntryPoint("beta", "pkg:Beta", Beta), "dist-b", "1"),
    )
    registry = Registry(Kind.MODEL, ModelLike, source=source, env={})
    # Execute / Assert
    assert registry.get("alpha") is Alpha
    with pytest.raises(PluginLoadError, match="does not implement the ModelLike protocol; it lacks build"):
        registry.get("beta")


def test_a_plugin_without_config_is_refused() -> None:
    @plugin("model", "bare")
    class Bare:
        pass

    registry = Registry(Kind.MODEL, source=source_of((FakeEntryPoint("bare", "pkg:Bare", Bare), "d", "1")), env={})
    with pytest.raises(PluginLoadError, match="must nest a dataclass named Config"):
        registry.get("bare")


def test_choose_resolves_name_and_options_once() -> None:
    registry = Registry(Kind.MODEL, ModelLike, source=source_of((FakeEntryPoint("alpha", "pkg:Alpha", Alpha), "d", "1")),
                        env={})
    chosen = registry.choose("alpha", {"width": "8"})
    assert (chosen.name, chosen.plugin, chosen.config) == ("alpha", Alpha, Alpha.Config(width=8))
    with pytest.raises(ConfigError, match="unknown setting model.alpha.depth; valid settings: rate, width"):
        registry.choose("alpha", {"depth": 2})
    with pytest.raises(ConfigError, match="model.alpha.rate must be a finite number; got 'nan'"):
        registry.choose("alpha", {"rate": "nan"})
    with pytest.raises(ConfigError, match=r"rate must be in \[0, 1\), got 1.5"):
        registry.choose("alpha", {"rate": 1.5})
    with pytest.raises(PluginNotFoundError, match="valid: alpha"):
        registry.choose("gamma")
