"""The settings of each side travel as one object from stage 12 on (ServerSettings, ClientSettings).

Each is a frozen dataclass whose every field has a default and a docstring that says what it bounds
and why (the string right below the field): one place to read every bound. The secret stays out of
repr(), which a log line may show.
"""

import ast
import dataclasses
import importlib
import inspect

import pytest

from support import stages_from

SIDES = (("server", "ServerSettings"), ("client", "ClientSettings"))


def documented_fields(settings: type) -> dict[str, str]:
    """Field name -> the docstring below it, read from the class's source (the stage under test's)."""
    cls = ast.parse(inspect.getsource(settings)).body[0]
    assert isinstance(cls, ast.ClassDef)
    return {
        field.target.id: str(below.value.value)
        for field, below in zip(cls.body, cls.body[1:], strict=False)
        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
        if isinstance(below, ast.Expr) and isinstance(below.value, ast.Constant)
    }


@pytest.mark.parametrize("module, name", SIDES)
@pytest.mark.parametrize("stage", stages_from("pages"))
def test_every_setting_is_frozen_with_a_default_and_a_docstring(stage: str, module: str, name: str) -> None:
    settings = getattr(importlib.import_module(f"{stage}.{module}"), name)
    assert dataclasses.is_dataclass(settings)
    assert settings.__dataclass_params__.frozen  # type: ignore[attr-defined]
    fields = dataclasses.fields(settings)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert not missing, f"{stage}.{module}.{name}: no default for {missing}"
    docs = documented_fields(settings)
    undocumented = [f.name for f in fields if not docs.get(f.name, "").strip()]
    assert not undocumented, f"{stage}.{module}.{name}: no docstring for {undocumented}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings().secret = "changed"  # type: ignore[misc]
    assert "hunter2" not in repr(settings(secret="hunter2"))


@pytest.mark.parametrize("stage", stages_from("pages"))
def test_server_and_client_take_their_settings_as_one_object(stage: str) -> None:
    for module_name, name in SIDES:
        module = importlib.import_module(f"{stage}.{module_name}")
        settings, cls = getattr(module, name), getattr(module, module_name.capitalize())
        parameters = inspect.signature(cls).parameters
        assert parameters["settings"].annotation is settings
        taken = {f.name for f in dataclasses.fields(settings)} & set(parameters)
        assert not taken, f"{stage}: {cls.__name__} takes {sorted(taken)} as arguments, not in its settings"
