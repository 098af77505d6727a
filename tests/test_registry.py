"""The one registry type: lookup, plug-in fallback, spellings and the refusal of duplicates."""
import pytest

from denserc import registry


def test_lookup_duplicates_and_unknown_names(monkeypatch):
    calls = []
    monkeypatch.setattr(registry, "load_plugins", lambda: calls.append("plugins"))
    things = registry.Registry("thing", lambda name: {name, name.replace("_", "-")})
    things.register("a-b", 1)
    assert things.get("a_b") == 1 and "a_b" in things and calls == []  # found without the plug-ins
    with pytest.raises(ValueError, match="thing 'a_b' is already registered"):
        things.register("a_b", 2)  # another spelling of a registered name is a duplicate too
    with pytest.raises(ValueError, match="unknown thing 'c'; known: a-b"):
        things.get("c")
    assert calls == ["plugins"]  # an unknown name is looked for in the plug-ins first
    things.remove("a-b")
    assert things.names() == ()


def test_a_plugin_registering_on_lookup_is_found(monkeypatch):
    things = registry.Registry("thing")
    monkeypatch.setattr(registry, "load_plugins", lambda: things.register("late", "value"))
    assert things.get("late") == "value"
