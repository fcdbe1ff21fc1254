"""Search spaces by name or file, checked before a search starts, and described for `esc50 spaces`.

    space = load_space("default")                  # a named space (spaces/builtin.py)
    space = load_space("my_space.py:wide")         # a user's file; function `space` if none named
    space = space.with_overrides({"epochs": 5})    # options of the search win over the space
    space.validate()                               # UserError before any trial starts
    config = space(optuna_trial)                   # what OptunaSearch calls (define-by-run)

A `Space` is a small picklable value (Tune pickles the searcher that holds it, for resume): a
user's file is read once, when the search starts, and its text travels with the space, so a
resumed search samples from the same space even if the file changed or moved since.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spaces.builtin import SPACES
from trainable.config import TrainConfig
from trainable.errors import UserError

SpaceFn = Callable[[Any], "dict[str, Any] | None"]
DEFAULT_FUNCTION = "space"
TRAIN_KEYS = frozenset(TrainConfig.keys())
_DEFAULT_EPOCHS = TrainConfig().epochs

_loaded: dict[tuple[str, str, str], SpaceFn] = {}  # (path, function, code digest) -> function


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass(frozen=True)
class Space:
    """A define-by-run search space plus the search's fixed overrides. Call it with an Optuna trial."""

    name: str  # a builtin name, or the file spec as given ("path.py:func")
    function: str  # the function's name
    path: str | None = None  # absolute path of a user's file (None: builtin)
    code: str | None = None  # the user's file text, frozen when the space was loaded
    overrides: Mapping[str, Any] = field(default_factory=dict)  # keys the search fixes (epochs, smoke model)

    # ---- the function ------------------------------------------------------------------------
    @property
    def builtin(self) -> bool:
        return self.path is None

    def fn(self) -> SpaceFn:
        """The space's own define-by-run function (without the overrides)."""
        if self.builtin:
            return SPACES[self.name]
        assert self.code is not None
        key = (self.path or "", self.function, hashlib.sha1(self.code.encode()).hexdigest())
        if key not in _loaded:
            _loaded[key] = _exec_function(self.path or "<space>", self.code, self.function)
        return _loaded[key]

    def source(self) -> str:
        """The space's source text (the whole user file, or the builtin function)."""
        if self.builtin:
            return inspect.getsource(SPACES[self.name])
        return self.code or ""

    @property
    def label(self) -> str:
        return self.name if self.builtin else f"{self.path}:{self.function}"

    def with_overrides(self, overrides: Mapping[str, Any]) -> Space:
        return Space(self.name, self.function, self.path, self.code, {**self.overrides, **overrides})

    def __call__(self, trial: Any) -> dict[str, Any]:
        """The trial's config: constants returned by the space, then the search's overrides.

        Ray's OptunaSearch merges this over the sampled values, so an override also replaces a
        sampled key. When `epochs` is overridden, `warmup_epochs` is scaled by the same factor.
        """
        return self._finish(trial, self.fn()(trial))

    def _finish(self, trial: Any, ret: Any) -> dict[str, Any]:
        if ret is None:
            ret = {}
        if not isinstance(ret, Mapping):
            raise TypeError(f"space {self.label} returned {type(ret).__name__}, expected a dict or None")
        out = dict(ret)
        if self.overrides:
            sampled = dict(trial.params)
            if "epochs" in self.overrides:
                base = out.get("epochs", sampled.get("epochs", _DEFAULT_EPOCHS))
                warmup = out.get("warmup_epochs", sampled.get("warmup_epochs"))
                new = self.overrides["epochs"]
                if warmup is not None and base and new != base:
                    out["warmup_epochs"] = float(warmup) * float(new) / float(base)
            out.update(self.overrides)
        return out

    # ---- sampling, checking, describing --------------------------------------------------------
    def sample(self, n: int = 16, seed: int = 0) -> list[Sample]:
        """`n` random draws (RandomSampler, seeded): what each trial would sample and train with."""
        import optuna

        _quiet_optuna()
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
        out = []
        for _ in range(n):
            trial = study.ask()
            returned = self.fn()(trial)
            config = {**trial.params, **self._finish(trial, returned)}
            out.append(Sample(dict(trial.params), dict(trial.distributions), returned, config))
            study.tell(trial, 0.0)
        return out

    def validate(self, n: int = 16, seed: int = 0) -> list[Sample]:
        """Draw `n` configs and check each resolves to a TrainConfig; UserError naming every problem."""
        try:
            samples = self.sample(n, seed)
        except UserError:
            raise
        except Exception as e:  # the user's code failed: say where
            raise UserError(f"space {self.label}: calling it failed: {type(e).__name__}: {e}") from None
        problems: list[str] = []
        for s in samples:
            if s.returned is not None and not isinstance(s.returned, Mapping):
                problems.append(f"returned {type(s.returned).__name__}, expected a dict or None")
                continue
            returned = dict(s.returned or {})
            unknown = sorted((set(s.params) | set(returned)) - TRAIN_KEYS)
            if unknown:
                problems.append(
                    f"unknown training config key(s) {unknown} (see `TrainConfig` in trainable/config.py)"
                )
            both = sorted(set(s.params) & set(returned))
            if both:
                problems.append(f"key(s) {both} are both sampled and returned; a key is one or the other")
            if not unknown:
                try:
                    TrainConfig.from_dict(s.config)
                except (TypeError, ValueError) as e:
                    problems.append(str(e))
        if problems:
            uniq = list(dict.fromkeys(problems))
            raise UserError(f"space {self.label}: " + "; ".join(uniq[:5]))
        return samples

    def describe(self, n: int = 200, seed: int = 0) -> SpaceInfo:
        """Parameters with their distributions (union over `n` draws, so conditional branches show)."""
        samples = self.sample(n, seed)
        params: dict[str, list[Any]] = {}
        seen: dict[str, int] = {}
        constants: dict[str, list[Any]] = {}
        for s in samples:
            for name, dist in s.distributions.items():
                dists = params.setdefault(name, [])
                if dist not in dists:
                    dists.append(dist)
                seen[name] = seen.get(name, 0) + 1
            for k, v in s.config.items():
                if k not in s.params:
                    values = constants.setdefault(k, [])
                    if v not in values:
                        values.append(v)
        return SpaceInfo(
            space=self,
            params={k: ParamInfo(k, tuple(d), seen[k] < len(samples)) for k, d in params.items()},
            constants={k: tuple(v) for k, v in constants.items()},
        )


@dataclass(frozen=True)
class Sample:
    params: dict[str, Any]  # what Optuna sampled
    distributions: dict[str, Any]  # optuna distributions of those
    returned: Any  # what the space function returned (constants)
    config: dict[str, Any]  # the trial config: sampled + returned + overrides


@dataclass(frozen=True)
class ParamInfo:
    name: str
    distributions: tuple[Any, ...]
    conditional: bool  # not sampled on every branch

    def range_text(self) -> str:
        return " | ".join(_dist_text(d) for d in self.distributions)


@dataclass(frozen=True)
class SpaceInfo:
    space: Space
    params: dict[str, ParamInfo]
    constants: dict[str, tuple[Any, ...]]

    def text(self) -> str:
        s = self.space
        doc = (inspect.getdoc(s.fn()) or "").splitlines()
        head = f"{s.name}" + (f"  ({s.path}:{s.function})" if not s.builtin else "")
        lines = [head + (f": {doc[0]}" if doc else "")]
        width = max([len(k) for k in (*self.params, *self.constants)] + [8])
        if not self.params:
            lines.append("  (no sampled parameters: one fixed point)")
        for p in self.params.values():
            cond = "  (conditional)" if p.conditional else ""
            lines.append(f"  {p.name:<{width}}  {p.range_text()}{cond}")
        if self.constants:
            fixed = ", ".join(
                f"{k}={v[0]!r}" if len(v) == 1 else f"{k}=<derived>"
                for k, v in sorted(self.constants.items())
            )
            lines.append(f"  fixed: {fixed}")
        return "\n".join(lines)


def _dist_text(d: Any) -> str:
    import optuna.distributions as od

    if isinstance(d, od.CategoricalDistribution):
        return "{" + ", ".join(repr(c) for c in d.choices) + "}"
    if isinstance(d, (od.FloatDistribution, od.IntDistribution)):
        kind = "int" if isinstance(d, od.IntDistribution) else "float"
        extra = " log" if d.log else ""
        if d.step not in (None, 1) or (kind == "float" and d.step is not None):
            extra += f" step {d.step:g}"
        return f"{kind} [{d.low:g}, {d.high:g}]{extra}"
    return repr(d)


# ---- loading -------------------------------------------------------------------------------------


def names() -> list[str]:
    return list(SPACES)


def _split_spec(spec: str) -> tuple[str, str | None]:
    """ "dir/file.py:func" -> ("dir/file.py", "func"); "dir/file.py" -> ("dir/file.py", None)."""
    if ":" in spec:
        path, func = spec.rsplit(":", 1)
        if func.isidentifier() and path:
            return path, func
    return spec, None


def is_file_spec(spec: str) -> bool:
    path, _ = _split_spec(spec)
    return path.endswith(".py") or os.sep in path or "/" in path


def load_space(spec: str, overrides: Mapping[str, Any] | None = None) -> Space:
    """A named space or a user's `file.py[:function]`; UserError naming the option otherwise."""
    spec = str(spec).strip()
    if spec in SPACES:
        space = Space(spec, spec)
    elif is_file_spec(spec):
        space = _load_file(spec)
    else:
        raise UserError(
            f"--space {spec!r}: no such space; named spaces: {', '.join(SPACES)}; "
            "or a Python file: path/to/file.py[:function]"
        )
    return space.with_overrides(overrides) if overrides else space


def _load_file(spec: str) -> Space:
    path, func = _split_spec(spec)
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path, encoding="utf-8") as f:
            code = f.read()
    except OSError as e:
        raise UserError(f"--space {spec!r}: cannot read {path}: {e.strerror or e}") from None
    module = _exec_module(path, code, spec)
    if func is None:
        if callable(getattr(module, DEFAULT_FUNCTION, None)):
            func = DEFAULT_FUNCTION
        else:
            own = _own_functions(module)
            if len(own) != 1:
                raise UserError(
                    f"--space {spec!r}: no function {DEFAULT_FUNCTION!r} in {path}; name one as "
                    f"{spec}:FUNCTION (functions there: {', '.join(own) or 'none'})"
                )
            func = own[0]
    if not callable(getattr(module, func, None)):
        own = _own_functions(module)
        raise UserError(
            f"--space {spec!r}: no function {func!r} in {path} (functions there: {', '.join(own) or 'none'})"
        )
    return Space(spec, func, path, code)


def _own_functions(module: types.ModuleType) -> list[str]:
    return [
        k
        for k, v in vars(module).items()
        if inspect.isfunction(v) and v.__module__ == module.__name__ and not k.startswith("_")
    ]


def _exec_module(path: str, code: str, spec: str | None = None) -> types.ModuleType:
    digest = hashlib.sha1(f"{path}\0{code}".encode()).hexdigest()[:12]
    module = types.ModuleType(f"esc50_space_{digest}")
    module.__file__ = path
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)  # the file may import its neighbours
    try:
        exec(compile(code, path, "exec"), module.__dict__)
    except Exception as e:
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        raise UserError(
            f"--space {spec or path!r}: {path} failed to load{where}: {type(e).__name__}: {e}"
        ) from None
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _exec_function(path: str, code: str, function: str) -> SpaceFn:
    return getattr(_exec_module(path, code), function)
