"""Smooth adversarial training (SAT): replace every ReLU by a smooth approximation.

Reference: C. Xie, M. Tan, B. Gong, A. Yuille, Q. V. Le, "Smooth Adversarial Training",
arXiv:2006.14536 (2020); official code ``cihangxie/SmoothAdversarialTraining`` (TensorFlow,
``ResNet/resnet_model.py``).

ReLU's derivative jumps at 0, which SAT argues makes both the attacker's gradient (weaker
adversarial examples) and the optimizer's gradient (worse updates) poorer during adversarial
training. This module registers one model transform, ``smooth-activation``, which

- replaces every ``nn.ReLU`` module (in-place ones included) by a fresh, never in-place smooth
  module: SiLU, GELU (exact or tanh form), softplus with a sharpness β, ELU, Mish, or the
  learnable "SmoothReLU" of the official code, ``relu(x − log(β|x| + 1)/β)`` with β = b²;
- replaces functional ReLU calls (``F.relu``, ``torch.relu``, ``x.relu()`` and their in-place
  forms) found by ``torch.fx`` symbolic tracing, when the model traces (see
  :meth:`SmoothActivation.apply` for what happens when it does not);
- with ``backward_only = true``, keeps ReLU in the forward pass and uses the smooth function's
  derivative in the backward pass only, for the attacker's gradients, the optimizer's
  gradients, or both (``scope``): the first study of the paper, which used the parametric
  softplus ``(1/α)·log(1 + e^{αx})`` (derivative ``σ(αx)``; here ``activation = "softplus"``
  with ``softplus_beta = α``).

Which parts are readings (docs/techniques/sat.md and docs/techniques/README.md, what could not be
read):

- the paper's α of the backward-only study is not known ([NOT FOUND]); the recipes use
  ``softplus_beta = 10``, our choice;
- "attacker" and "optimizer" are mapped onto artplug's phases (``artplug.current_phase()``):
  ``"attack"`` is the perturbation's ``generate``; every ``"update*"`` phase is the weight
  update; ``"eval"`` (validation, the sanity gate, the ART evaluation, user code) always gets
  the plain ReLU derivative, so a backward-only model is evaluated as the plain ReLU network it
  is in the forward pass;
- SmoothReLU keeps one learnable scalar ``b`` per replaced module (initialised to 20, as the
  official code's per-layer variable). Like the official code, which decays only convolution
  and fully connected weights, ``b`` gets no weight decay (the parameter carries the engine's
  ``artplug.no_weight_decay``); ``smoothrelu_learnable = false`` freezes ``b`` instead.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, fx, nn
from torch.autograd.function import FunctionCtx, once_differentiable

import artplug

Activation = Literal["silu", "gelu", "softplus", "elu", "mish", "smoothrelu"]
Scope = Literal["attack", "update", "both"]

# Lower bound of β = b² before dividing by it, so that b = 0 gives 0 instead of NaN.
_MIN_BETA = 1e-12
# Perturbations without a separate attack pass: "none" has no attack, and FreeAT's step comes
# from the weight-update backward (phase "update-adv"), so scope = "attack" would smooth nothing.
_NO_ATTACK_PASS = ("none", "free")
# Which artplug phases each backward-only scope smooths (artplug/phase.py). "eval" is in none.
_SCOPE_PHASES: dict[str, frozenset[str]] = {
    "attack": frozenset({"attack"}),
    "update": frozenset({"update-clean", "update-adv", "update"}),
    "both": frozenset({"attack", "update-clean", "update-adv", "update"}),
}


# --------------------------------------------------------------------------------------------
# The activations
# --------------------------------------------------------------------------------------------


class SmoothReLU(nn.Module):
    """``relu(x − log(β|x| + 1)/β)`` with ``β = b²`` and ``b`` a learnable scalar (SAT code).

    For ``x > 0`` the value is ``x − log(1 + βx)/β`` and the derivative ``βx/(βx + 1)``; for
    ``x ≤ 0`` both are 0. The derivative is therefore continuous at 0 (unlike ReLU's) and tends
    to ReLU's as β grows; ``b = 20`` (β = 400) is the official initialisation.
    """

    def __init__(self, b: float = 20.0, learnable: bool = True) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor(float(b)), requires_grad=learnable)
        # The engine skips [optim] weight_decay for flagged parameters: the SAT code decays only
        # conv and fc weights, and decay on b would bend the activation away from ReLU.
        artplug.no_weight_decay(self.b)

    def forward(self, x: Tensor) -> Tensor:
        """Apply SmoothReLU elementwise (half-precision inputs are computed in float32)."""
        # x − log1p(β x)/β cancels for small β x; in bf16 the correction would drown in round-off.
        work = artplug.full_precision(x)
        beta = self.b.square().clamp_min(_MIN_BETA).to(work.dtype)
        # relu(x − log1p(β|x|)/β) written on relu(x): equal everywhere (both sides are 0 for
        # x ≤ 0, since log1p(βu)/β ≤ u), and no |x| kink to differentiate through.
        positive = torch.relu(work)
        return (positive - torch.log1p(beta * positive) / beta).to(x.dtype)

    def extra_repr(self) -> str:
        """Show ``b`` and whether it is trained in ``print(model)``."""
        return f"b={self.b.item():.4g}, learnable={self.b.requires_grad}"


def make_activation(params: SmoothActivation.Params) -> nn.Module:
    """A fresh, out-of-place smooth activation module for ``params.activation``."""
    name = params.activation
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU(approximate=params.gelu_approximate)
    if name == "softplus":
        return nn.Softplus(beta=params.softplus_beta)
    if name == "elu":
        return nn.ELU()
    if name == "mish":
        return nn.Mish()
    return SmoothReLU(params.smoothrelu_b, learnable=params.smoothrelu_learnable)


class _ReLUWithSmoothBackward(torch.autograd.Function):
    """``relu(x)`` forward; backward multiplies the incoming gradient by ``smooth'(x)``."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, smooth: nn.Module) -> Tensor:
        ctx.save_for_backward(x)
        ctx.smooth = smooth  # type: ignore[attr-defined]
        return torch.relu(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        # grad · smooth'(x) as the vector-Jacobian product of the (elementwise) smooth function:
        # exact for every activation offered, and the same derivative as its full replacement.
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (input_grad,) = torch.autograd.grad(ctx.smooth(leaf), leaf, grad)
        return input_grad, None


class ReLUSmoothBackward(nn.Module):
    """ReLU in the forward pass; the smooth activation's derivative in the chosen backwards.

    The scope is decided when the forward runs, from ``artplug.current_phase()``: the backward
    pass runs after the phase has ended (the engine calls ``backward()`` outside the
    ``"update"`` phase, and an attack's ``autograd.grad`` may too), so the forward records its
    choice in the graph it builds. A forward in a phase outside ``scope`` (always the case for
    ``"eval"``) builds a plain ``torch.relu`` node with ReLU's own derivative.
    """

    def __init__(self, smooth: nn.Module, scope: Scope) -> None:
        super().__init__()
        self.smooth = smooth
        self.scope: Scope = scope

    def forward(self, x: Tensor) -> Tensor:
        """``relu(x)``, with the smooth derivative attached when this phase is in scope."""
        if artplug.current_phase() in _SCOPE_PHASES[self.scope]:
            out: Tensor = _ReLUWithSmoothBackward.apply(x, self.smooth)
            return out
        return torch.relu(x)

    def extra_repr(self) -> str:
        """Show the scope in ``print(model)`` (the smooth function is the child module)."""
        return f"scope={self.scope!r}"


# --------------------------------------------------------------------------------------------
# Finding the ReLUs
# --------------------------------------------------------------------------------------------


def _is_functional_relu(node: fx.Node) -> bool | None:
    """None if ``node`` is no functional ReLU; else whether it is an in-place one."""
    if node.op == "call_function":
        if node.target in (F.relu_, torch.relu_):
            return True
        if node.target is torch.relu:
            return False
        if node.target is F.relu:
            inplace = node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)
            return bool(inplace)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return node.target == "relu_"
    return None


def _redirect_later_uses(graph: fx.Graph, source: fx.Node, after: fx.Node, new: fx.Node) -> int:
    """Make the users of ``source`` that run after ``after`` read ``new``; return how many.

    An in-place ReLU overwrites its input, so code after it that names the input (``x.relu_()``
    then ``use(x)``) sees the activated values; fx records such a use as a use of the input
    node. The out-of-place replacement must take over those uses explicitly.
    """
    order = {node: index for index, node in enumerate(graph.nodes)}
    start = order[after]
    later = [user for user in source.users if user is not new and order[user] > start]
    for user in later:
        user.replace_input_with(source, new)
    return len(later)


def _same_graph_in_both_modes(model: nn.Module) -> bool:
    """Whether tracing in train mode and in eval mode gives the same code.

    fx freezes Python control flow at trace time, so a forward that branches on
    ``self.training`` (``F.dropout(x, training=self.training)``, an auxiliary head) would keep
    only the mode it was traced in.
    """
    was_training = model.training
    try:
        codes = {fx.symbolic_trace(model.train(mode)).code for mode in (True, False)}
    finally:
        model.train(was_training)
    return len(codes) == 1


def _functional_relu_in_source(model: nn.Module) -> tuple[list[str], list[str]]:
    """Classes whose source calls ReLU as a function, and classes whose source is unreadable.

    A syntactic scan (``ast``) of every class in the model's modules (and their bases), used
    only to explain a model that fx cannot trace. It recognises ``F.relu(...)``,
    ``torch.relu(...)``, ``torch.nn.functional.relu(...)``, a bare ``relu(...)``, a method call
    ``<expr>.relu()`` and the ``relu_`` forms; it cannot see a ReLU stored in an attribute
    (``self.act = F.relu``).
    """
    found: list[str] = []
    unreadable: list[str] = []
    seen: set[type] = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls in seen or cls.__module__.startswith("torch.") or cls is object:
                continue
            seen.add(cls)
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
            except (OSError, TypeError, SyntaxError):
                unreadable.append(cls.__qualname__)
                continue
            if any(_calls_relu(node) for node in ast.walk(tree)):
                found.append(cls.__qualname__)
    return found, unreadable


def _calls_relu(node: ast.AST) -> bool:
    """Whether an AST node is a functional ReLU call (see :func:`_functional_relu_in_source`)."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in ("relu", "relu_")
    if not isinstance(func, ast.Attribute) or func.attr not in ("relu", "relu_"):
        return False
    owner = func.value
    if isinstance(owner, ast.Name) and owner.id == "self":
        return False  # self.relu(x): a module call, replaced as a module
    namespaces = ("F", "torch", "functional")
    if isinstance(owner, ast.Name) and owner.id in namespaces:
        return True
    if isinstance(owner, ast.Attribute) and owner.attr in namespaces:
        return True
    # <tensor>.relu() / <tensor>.relu_(): a Tensor method takes no arguments.
    return not node.args and not node.keywords


def _replace_modules(model: nn.Module, make: Callable[[], nn.Module]) -> int:
    """Swap every ``nn.ReLU`` submodule for ``make()``, in place; return how many were swapped.

    A ReLU instance registered in several places (or called several times) gets one replacement
    shared the same way, so a learnable SmoothReLU ``b`` belongs to the module, as before.
    """
    replacements: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                if id(child) not in replacements:
                    replacements[id(child)] = make()
                setattr(parent, child_name, replacements[id(child)])
    return len(replacements)


# --------------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------------


class SmoothActivation:
    """SAT (Xie et al. 2020): replace every ReLU by a smooth activation (or only its gradient).

    ``apply`` swaps each ``nn.ReLU`` module for a new out-of-place module (``activation``) and,
    when ``torch.fx`` can trace the model, each functional ReLU call too (see :meth:`apply`).
    With ``backward_only = true`` the forward stays ReLU and the backward pass uses the
    derivative of ``activation`` during the phases of ``scope`` (the paper's first study, with
    the parametric softplus: ``activation = "softplus"``, ``softplus_beta`` = its α).

    Readings (docs/techniques/sat.md): the α of that study is [NOT FOUND] (recipes use 10);
    "attacker"
    = the ``"attack"`` phase, "optimizer" = the ``"update*"`` phases, evaluation always has the
    plain ReLU derivative; SmoothReLU's ``b`` (one per replaced module, init 20 as the official
    code) is never weight-decayed, as in the official code, and is frozen when not learnable.

    Must be the first ``[[transform]]`` (SAT → SLAT sites → AALP dropout → HE head), and may be
    listed once. After ``apply``, ``replaced_modules`` and ``replaced_calls`` count the swaps.
    """

    name = "smooth-activation"
    paper = (
        'C. Xie, M. Tan, B. Gong, A. Yuille, Q. V. Le, "Smooth Adversarial Training", '
        "arXiv:2006.14536 (2020)"
    )
    # First: later hooks (latent sites) and heads must see the final activations.
    stage: ClassVar[artplug.TransformStage] = "activation"

    class Params(artplug.Params):
        """Parameters of the ``smooth-activation`` model transform."""

        activation: Activation = Field(
            "silu",
            description="smooth function replacing ReLU: silu (x*sigmoid(x), SAT's most robust), "
            "gelu, softplus ((1/beta)*log(1+exp(beta*x))), elu, mish, or smoothrelu "
            "(relu(x - log(b^2*|x|+1)/b^2), b learnable)",
        )
        softplus_beta: float = Field(
            1.0,
            gt=0.0,
            allow_inf_nan=False,
            description="softplus only: sharpness beta (the alpha of the paper's parametric "
            "softplus; 1 = plain softplus, larger = closer to ReLU)",
        )
        gelu_approximate: Literal["tanh", "none"] = Field(
            "tanh",
            description="gelu only: 'tanh' approximation (the SAT code) or the exact erf form "
            "('none')",
        )
        smoothrelu_b: float = Field(
            20.0,
            gt=0.0,
            allow_inf_nan=False,
            description="smoothrelu only: initial b (beta = b^2; the SAT code starts at 20)",
        )
        smoothrelu_learnable: bool = Field(
            True,
            description="smoothrelu only: train b (never weight-decayed, as in the SAT code); "
            "false keeps b fixed",
        )
        backward_only: bool = Field(
            False,
            description="keep ReLU in the forward pass and use the activation's derivative only "
            "in the backward passes of 'scope'",
        )
        scope: Scope = Field(
            "both",
            description="backward_only only: smooth the attacker's gradients ('attack'), the "
            "optimizer's ('update') or both; evaluation always gets ReLU's derivative",
        )
        untraceable: Literal["error", "warn"] = Field(
            "error",
            description="when the model calls ReLU as a function in forward and torch.fx cannot "
            "trace it: fail, or warn and replace the ReLU modules only",
        )

        @model_validator(mode="after")
        def _settings_apply(self) -> Self:
            # A value that cannot take effect is a mistake in the recipe, not a no-op. Compare
            # with the defaults (not fields_set) so that a resolved recipe, which spells out
            # every default, validates again.
            defaults = {name: field.default for name, field in type(self).model_fields.items()}
            owners = {
                "softplus_beta": "softplus",
                "gelu_approximate": "gelu",
                "smoothrelu_b": "smoothrelu",
                "smoothrelu_learnable": "smoothrelu",
            }
            problems = [
                f"{key} = {getattr(self, key)!r} only applies to activation = {owner!r}"
                for key, owner in owners.items()
                if self.activation != owner and getattr(self, key) != defaults[key]
            ]
            if not self.backward_only and self.scope != defaults["scope"]:
                problems.append(f"scope = {self.scope!r} only applies with backward_only = true")
            if self.backward_only and self.activation == "smoothrelu":
                problems.append(
                    "backward_only cannot use smoothrelu: its b would never be trained (ReLU "
                    "runs in the forward pass); use softplus with softplus_beta as the sharpness"
                )
            if problems:
                raise ValueError("; ".join(problems))
            return self

    def __init__(self, params: Params) -> None:
        self.params = params
        self.replaced_modules = 0
        self.replaced_calls = 0

    def _make(self) -> nn.Module:
        """One replacement for one ReLU: the smooth module, or ReLU with its smooth gradient."""
        smooth = make_activation(self.params)
        if self.params.backward_only:
            return ReLUSmoothBackward(smooth, self.params.scope)
        return smooth

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace the model's ReLUs; return the model (a ``torch.fx.GraphModule`` if needed).

        1. The model is traced with ``torch.fx``. Each functional ReLU call in the graph becomes
           a call of a new submodule ``smooth_relu_<k>``; for in-place calls (and in-place
           ``nn.ReLU`` modules whose return value is ignored) the later reads of their input
           are redirected to the new output, since the replacement does not write in place.
           If there was anything to rewrite, the result is a ``GraphModule`` with the model's
           class name, the same submodule names (so the same state-dict keys) and the model's
           public plain attributes; otherwise the model object is kept and only its modules
           are swapped. A traced graph has no Python control flow: tracing in train and in
           eval mode must give the same code, else the model is treated as untraceable.
        2. Every ``nn.ReLU`` module is swapped for a new module, in place.

        Raises:
            artplug.RecipeError: the model has no ReLU at all (e.g. the transform is listed
                twice), or it calls ReLU as a function, cannot be traced and ``untraceable =
                "error"``. With ``"warn"`` the second case warns and replaces modules only.
        """
        self.replaced_modules = self.replaced_calls = 0
        model = self._replace_functional(model)
        self.replaced_modules = _replace_modules(model, self._make)
        if self.replaced_modules + self.replaced_calls == 0:
            raise artplug.RecipeError(
                f"[[transform]] {self.name}",
                [
                    f"{type(model).__name__} has no ReLU to replace (no nn.ReLU module and no "
                    "functional relu call found by torch.fx); SAT only changes ReLU "
                    "activations. Is the transform listed twice, or does the model use another "
                    "activation?"
                ],
            )
        return model

    def _replace_functional(self, model: nn.Module) -> nn.Module:
        """Step 1 of :meth:`apply`: rewrite functional ReLU calls through fx when there are any."""
        try:
            traced = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types for untraceable Python
            self._untraceable(model, f"{type(exc).__name__}: {exc}")
            return model
        graph = traced.graph
        sites = [(node, _is_functional_relu(node)) for node in graph.nodes]
        functional = [(node, inplace) for node, inplace in sites if inplace is not None]
        inplace_modules = [
            node
            for node in graph.nodes
            if node.op == "call_module"
            and isinstance(module := traced.get_submodule(str(node.target)), nn.ReLU)
            and module.inplace
            and node.args
        ]
        redirected = 0
        for node in inplace_modules:
            source = node.args[0]
            if isinstance(source, fx.Node):
                redirected += _redirect_later_uses(graph, source, node, node)
        if not functional and not redirected:
            return model  # nothing that module swapping misses: keep the user's object
        if not _same_graph_in_both_modes(model):
            self._untraceable(
                model, "its forward depends on the training flag, which fx would freeze"
            )
            return model
        for index, (node, inplace) in enumerate(functional):
            name = f"smooth_relu_{index}"
            while hasattr(traced, name):
                name = f"_{name}"
            traced.add_submodule(name, self._make())
            source = node.args[0]
            with graph.inserting_after(node):
                new = graph.call_module(name, (source,))
            node.replace_all_uses_with(new)
            if inplace and isinstance(source, fx.Node):
                _redirect_later_uses(graph, source, node, new)
            graph.erase_node(node)
        graph.lint()
        traced.recompile()
        _copy_plain_attributes(model, traced)
        self.replaced_calls = len(functional)
        return traced

    def _untraceable(self, model: nn.Module, reason: str) -> None:
        """Raise or warn when fx cannot cover a model that may call ReLU as a function."""
        found, unreadable = _functional_relu_in_source(model)
        if not found and not unreadable:
            return  # only ReLU modules: swapping them covers every activation
        what = (
            f"calls ReLU as a function in {', '.join(found)}"
            if found
            else f"may call ReLU as a function (source of {', '.join(unreadable)} unreadable)"
        )
        first_line = reason.strip().splitlines()[0] if reason.strip() else reason
        message = (
            f"{type(model).__name__} {what}, and torch.fx cannot trace it ({first_line}), so "
            "those calls would stay ReLU; use nn.ReLU modules in the model, make its forward "
            'traceable, or set untraceable = "warn" to replace the ReLU modules only'
        )
        if self.params.untraceable == "error" and found:
            raise artplug.RecipeError(f"[[transform]] {self.name}", [message])
        warnings.warn(f"{self.name}: {message}", RuntimeWarning, stacklevel=3)

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Reject SAT twice and a backward scope with no pass (the order follows ``stage``)."""
        transforms = list(recipe.transforms)
        count = transforms.count(cls.name)
        if count > 1:
            yield f"{cls.name} is listed {count} times; ReLUs can only be replaced once"
        no_attack_pass = recipe.perturbation in _NO_ATTACK_PASS
        if params.backward_only and params.scope == "attack" and no_attack_pass:
            yield (
                f"scope = 'attack' smooths nothing with perturbation {recipe.perturbation!r}, "
                "which has no separate attack pass (FreeAT's step comes from the update "
                "backward); use scope = 'update' or 'both'"
            )


def _copy_plain_attributes(model: nn.Module, traced: fx.GraphModule) -> None:
    """Carry the model's public non-module attributes (``num_classes``...) over to the copy."""
    for key, value in vars(model).items():
        if key.startswith("_") or key == "training" or hasattr(traced, key):
            continue
        setattr(traced, key, value)


@artplug.hookimpl
def register_model_transforms(register: artplug.Register) -> None:
    """Register the ``smooth-activation`` model transform."""
    register(SmoothActivation)
