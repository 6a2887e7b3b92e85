"""A user's own architectures: backbones that timm has never heard of.

Two routes, each usable wherever a timm name is (README, "Your own model"):

- `--backbone mymodels:twistnet18`: an importable module (the current folder is searched first,
  as `python -m` does) and a factory in it that takes `num_classes` plus whichever of timm's
  keyword arguments it names (`img_size`, `in_chans`, `drop_rate`, ...: the others are not passed).
  A package can name its factories once, as entry points in the `mlexp.backbones` group
  (`twistnet18 = "mypackage.models:twistnet18"`), and then `--backbone twistnet18` works.
- `--plugins mymodels` (or `MLEXP_PLUGINS=mymodels`, comma-separated): modules whose timm
  `@register_model` functions become backbone names like timm's own once they are imported.

A `module:factory` is registered in timm's registry under the factory's name, so building,
weights files (`weights/twistnet18.safetensors`), fine-tuning groups and transforms then treat it
as any timm name; the reference is recorded in the run's config so that sweep children, resumed
runs and logged models import it again (a logged model carries the module's source, see
`plugin_sources`).
"""

# Imported where used: `timm` (about 3 s with torch), because `mlexp --help` and the option
# checks read a user's modules here before it loads.
from __future__ import annotations

import functools
import importlib
import inspect
import os
import shutil
import sys
import warnings
from importlib.metadata import entry_points, packages_distributions, version
from pathlib import Path
from types import ModuleType

from mlexp.errors import MlexpError

ENTRY_POINT_GROUP = "mlexp.backbones"
PLUGINS_ENV = "MLEXP_PLUGINS"
# What timm.create_model passes to every entry point for its own bookkeeping: a plain factory
# gets them only if its signature names them (a `**kwargs` passed on to nn.Module would choke).
_TIMM_ONLY = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_imported: set[str] = set()


def plugin_modules(plugins: str | None) -> list[str]:
    """The modules to import: --plugins, then $MLEXP_PLUGINS, each once, in order."""
    names = [*(plugins or "").split(","), *os.environ.get(PLUGINS_ENV, "").split(",")]
    return list(dict.fromkeys(name.strip() for name in names if name.strip()))


def load_plugins(plugins: str | None) -> None:
    """Import every plugin module (their timm `@register_model` functions register themselves)."""
    for name in plugin_modules(plugins):
        if name in _imported:
            continue
        from timm.models import list_models, model_entrypoint

        before = {model: model_entrypoint(model) for model in list_models()}
        import_user_module(name, f"--plugins {name}")
        _imported.add(name)
        replaced = sorted(model for model, fn in before.items() if model_entrypoint(model) is not fn)
        if replaced:
            raise MlexpError(f"--plugins {name}: registers {', '.join(replaced[:3])}, already a timm model; "
                             f"rename it so that the name means one network")


def plugin_reference(name: str) -> tuple[str, str, str] | None:
    """(module, factory, backbone name) that a backbone name refers to: `module:factory` (named
    after the factory), or an entry point of the `mlexp.backbones` group (named after the entry
    point); None for every other name."""
    if ":" in name:
        module, _, factory = name.partition(":")
        if not module or not factory.isidentifier():
            raise MlexpError(f"--backbone {name!r}: a model of your own is MODULE:FACTORY, e.g. mymodels:twistnet18")
        return module, factory, factory
    value = _entry_point_backbones().get(name)
    if value is None:
        return None
    module, _, factory = value.partition(":")
    return module.strip(), factory.strip(), name


@functools.lru_cache(maxsize=1)
def _entry_point_backbones() -> dict[str, str]:
    """name -> "module:factory" of every installed package's `mlexp.backbones` entry points
    (read once: resolving a name happens several times in a run)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register_factory(module_name: str, factory_name: str, backbone_name: str) -> str:
    """Import the module, check the factory, and register it with timm as `backbone_name`
    (idempotent). One clear MlexpError for each way it cannot work."""
    reference = f"{module_name}:{factory_name}"
    module = import_user_module(module_name, f"--backbone {reference}")
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise MlexpError(f"--backbone {reference}: module {module_name} ({module.__file__}) has no function "
                         f"{factory_name!r}")
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "num_classes" not in parameters and not takes_any:
        raise MlexpError(f"--backbone {reference}: {factory_name}() must take num_classes (mlexp sizes the "
                         f"classifier to the data), e.g. def {factory_name}(num_classes=1000, **kwargs)")

    from timm.models import is_model, model_entrypoint, register_model

    if is_model(backbone_name):
        registered = model_entrypoint(backbone_name)
        if getattr(registered, "__wrapped__", registered) is factory:
            return backbone_name
        if registered.__module__ != factory.__module__:  # the same module imported again may register again
            raise MlexpError(f"--backbone {reference}: {backbone_name!r} is also a timm model "
                             f"({registered.__module__}); rename the factory so that the name means one network")

    @functools.wraps(factory)
    def build(**kwargs):
        passed = {key: value for key, value in kwargs.items()
                  if key in parameters or (takes_any and key not in _TIMM_ONLY)}
        return factory(**passed)

    build.__name__ = backbone_name
    build.__module__ = factory.__module__  # timm files it under the user's module (its checkpoint_filter_fn too)
    with warnings.catch_warnings():  # "Overwriting": only ever the same module's factory, imported again
        warnings.simplefilter("ignore")
        register_model(build)
    return backbone_name


def import_user_module(name: str, option: str) -> ModuleType:
    """Import a user's module, from the current folder first: the `mlexp` script's own folder is
    what Python puts on sys.path, not the folder the user is working in."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    importlib.invalidate_caches()  # a module written since this process looked at the folder
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise MlexpError(f"{option}: cannot import module {name!r} ({type(exc).__name__}: {exc}); it must be "
                         f"importable from the current folder ({here}) or installed") from exc


def user_modules(backbone: str, plugins: str | None, extra: tuple[str, ...] = ()) -> list[str]:
    """The modules of a user's own that a run's network needs: MODULE of MODULE:FACTORY, the
    plugins, and `extra` (the module of a task of the user's own)."""
    reference = plugin_reference(backbone) if ":" in backbone else None
    return list(dict.fromkeys([*([reference[0]] if reference else []), *plugin_modules(plugins), *extra]))


def copy_plugin_sources(backbone: str, plugins: str | None, folder: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """Copy the source of the user's modules into `folder` (which a loader then puts on sys.path)."""
    copied = []
    for source in plugin_sources(user_modules(backbone, plugins, extra)):
        target = folder / source.name
        folder.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
        copied.append(target)
    return copied


def plugin_requirements(backbone: str, plugins: str | None, extra: tuple[str, ...] = ()) -> list[str]:
    """The installed packages (`name==version`) that provide the user's modules: what a served
    model must have installed, where their source does not travel with it. Asks every installed
    distribution which modules it provides (~2 s), so only when such a module is in use."""
    installed = [name for name in user_modules(backbone, plugins, extra) if not _travels_as_source(name)]
    if not installed:
        return []
    providers = packages_distributions()
    return [f"{dist}=={version(dist)}" for name in installed for dist in providers.get(name.split(".")[0], [])]


def _travels_as_source(name: str) -> bool:
    top = sys.modules.get(name.split(".")[0])
    origin = getattr(top, "__file__", None)
    return origin is not None and "site-packages" not in Path(origin).parts


def plugin_sources(module_names: list[str]) -> list[Path]:
    """The source a logged model needs to rebuild a user's network in a fresh process: for each
    module not installed as a package (not under site-packages), its file or its top-level
    package's folder. Installed packages travel as requirements instead."""
    sources = []
    for name in module_names:
        if _travels_as_source(name):
            path = Path(sys.modules[name.split(".")[0]].__file__)
            sources.append(path.parent if path.name == "__init__.py" else path)
    return list(dict.fromkeys(sources))
