"""Share's adapted linear layer (Kaushik et al., "Shared LoRA Subspaces for almost Strict
Continual Learning", arXiv 2602.06043; METHODS.md §1).

One frozen ``nn.Linear`` ``W0`` ``(d_out, d_in)`` plus the shared bases ``U`` ``(d_out, k_B)``
and ``V`` ``(d_in, k_A)`` and, for every task ``t``, coefficients ``C_B[t]`` ``(k_B, p)`` and
``C_A[t]`` ``(k_A, p)``. Task t's update is ``ΔW_t = s · U C_B[t] C_A[t]ᵀ Vᵀ``.

While a task trains the layer also holds a :class:`ShareTrainState`: either the task's
coefficients plus ``φ`` temporary directions (``B_t = U C_B + U⁺ E_B``,
``A_tᵀ = V C_A + V⁺ E_A``), or, before any subspace exists, a plain rank-r LoRA that seeds
it. The layer knows nothing about tasks' names: tasks are row indices into the coefficient
tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sharecl.coeff_log import CoefficientLog
from sharecl.routing import Router
from sharecl.subspace import MergeGrams, MergeResult, orthonormal_complement

__all__ = ["ShareLinear", "ShareTrainState", "PHI_INITS", "INITS"]

#: how the temporary directions ``U⁺``, ``V⁺`` start (:meth:`ShareLinear.begin_task`)
PHI_INITS = ("complement", "top", "uniform")
#: how a new task's coefficients start: ``zero`` (``C_B = 0``, ``C_A`` small random: ΔW = 0),
#: ``previous`` (the last task's: ΔW_t = ΔW_{t−1}), ``top`` (``C_B = 0``, ``C_A`` the top-p basis directions)
INITS = ("zero", "previous", "top")


def _temporary_directions(basis: torch.Tensor, phi: int, how: str, generator: torch.Generator) -> torch.Tensor:
    """``φ`` starting temporary directions ``(d, φ)`` for a basis ``(d, k)`` (see ``phi_init``)."""
    d, k = basis.shape
    if how == "uniform":  # the authors' code: additive rank-ρ terms with U(−0.5, 0.5) entries
        return torch.rand(d, phi, generator=generator, dtype=torch.float64).sub_(0.5).to(basis)
    if how == "top":  # the paper's figure: the new factors start as copies of the top-φ existing ones
        top = basis[:, : min(phi, k)]
        rest = orthonormal_complement(basis, phi - top.shape[1], generator) if phi > k else basis[:, :0]
        return torch.cat([top, rest], 1)
    return orthonormal_complement(basis, phi, generator)


class ShareTrainState(nn.Module):
    """Trainable tensors of one layer while one task trains.

    ``kind == "seed"``: a plain LoRA, ``lora_B`` ``(d_out, r)`` zeros and ``lora_A`` ``(r, d_in)``
    Kaiming-uniform (PEFT's init), used for the first task when no subspace exists yet.

    ``kind == "coeff"``: ``coeff_B`` ``(k_B, p)``, ``coeff_A`` ``(k_A, p)``, temporary directions
    ``U_plus`` ``(d_out, φ)`` and ``V_plus`` ``(d_in, φ)`` (orthonormal, orthogonal to ``U``/``V``
    at start) and their coefficients ``E_B``, ``E_A`` ``(φ, p)``. ``init="zero"`` gives
    ``ΔW = 0`` at step 0 (B-side zero, A-side small random); ``init="previous"`` copies the
    previous task's coefficients with ``E_A = E_B = 0``, so ``ΔW_t = ΔW_{t-1}`` at step 0
    (forward transfer).
    """

    # the parameters registered by __init__ (which of them exist depends on ``kind``)
    lora_B: nn.Parameter
    lora_A: nn.Parameter
    coeff_B: nn.Parameter
    coeff_A: nn.Parameter
    U_plus: nn.Parameter
    V_plus: nn.Parameter
    E_B: nn.Parameter
    E_A: nn.Parameter

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.kind = kind
        for name, value in tensors.items():
            self.register_parameter(name, nn.Parameter(value))

    #: names of the coefficient tensors (the rest are directions: the seed LoRA's factors, ``U⁺``, ``V⁺``)
    COEFFICIENTS = ("coeff_B", "coeff_A", "E_B", "E_A")

    def coefficients(self) -> list[nn.Parameter]:
        """The coefficient parameters (``coeff_B``, ``coeff_A``, ``E_B``, ``E_A``); empty for a seed LoRA."""
        return [p for n, p in self.named_parameters() if n in self.COEFFICIENTS]

    def directions(self) -> list[nn.Parameter]:
        """The direction parameters: the seed LoRA's ``lora_B``/``lora_A``, or ``U_plus``/``V_plus``."""
        return [p for n, p in self.named_parameters() if n not in self.COEFFICIENTS]

    def factors(self, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Current ``(B_t (d_out, q), A_t (q, d_in))`` of the training task (q = r or p)."""
        if self.kind == "seed":
            return self.lora_B, self.lora_A
        B = U @ self.coeff_B
        At = V @ self.coeff_A
        if self.U_plus.shape[1]:
            B = B + self.U_plus @ self.E_B
            At = At + self.V_plus @ self.E_A
        return B, At.T


class ShareLinear(nn.Module):
    """A frozen ``nn.Linear`` with Share's shared subspace and per-task coefficients.

    Args:
        base: the layer to adapt; its parameters are frozen.
        scaling: ``s`` in ``ΔW = s · B @ A`` (PEFT's ``lora_alpha / r``).
        p: pseudo-rank, the number of columns of each task's coefficients.
        router: the routing context of the owning method (:mod:`sharecl.routing`); a private
            one when None.

    Buffers (float32, saved in ``state_dict``): ``U`` ``(d_out, k_B)``, ``V`` ``(d_in, k_A)``,
    ``coeff_B`` ``(T, k_B, p)``, ``coeff_A`` ``(T, k_A, p)``. The coefficients are materialised
    from ``log_B`` / ``log_A`` (:class:`~sharecl.coeff_log.CoefficientLog`: a checkpoint plus the
    merges since), which is what a store appends to, on first use after a merge or a load (reading
    ``coeff_B`` / ``coeff_A``, a forward, ``state_dict`` or ``.to``): a merge itself reads old tasks
    only through the log (:func:`~sharecl.subspace.merge_subspace`), so its cost does not include
    the ``O(T·k²·p)`` re-expression of every task.

    What a forward computes: ``train_state`` while a task trains (from ``begin_task`` to the
    merge); else the router's current route: ``row_tasks`` ``(N,)`` int64 for a batch mixing
    tasks, or ``task_index`` for one task; else the plain base layer.
    """

    def __init__(self, base: nn.Linear, *, scaling: float, p: int, router: Router | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"ShareLinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        for prm in self.base.parameters():
            prm.requires_grad_(False)
        self.scaling = float(scaling)
        self.p = int(p)
        d_out, d_in = base.out_features, base.in_features
        w = base.weight
        self.register_buffer("U", w.new_zeros(d_out, 0))
        self.register_buffer("V", w.new_zeros(d_in, 0))
        self.register_buffer("coeff_B", w.new_zeros(0, 0, self.p))
        self.register_buffer("coeff_A", w.new_zeros(0, 0, self.p))
        self.log_B = CoefficientLog(w.new_zeros(0, 0, self.p))
        self.log_A = CoefficientLog(w.new_zeros(0, 0, self.p))
        self._grams: MergeGrams | None = None  # the next merge's Gram matrices (None: from the coefficients)
        self.router = router or Router()
        self.train_state: ShareTrainState | None = None
        self._mix_cache: torch.Tensor | None = None
        self._finetune_index: int | None = None
        self._stale = False  # coeff_B / coeff_A lag behind the logs until first use (_materialize)

    def __getattr__(self, name: str):
        if name in ("coeff_B", "coeff_A") and self.__dict__.get("_stale"):
            self._materialize()
        return super().__getattr__(name)

    def _materialize(self) -> None:
        dt = self.base.weight.dtype
        coeff_B, coeff_A = self.log_B.materialize(dt), self.log_A.materialize(dt)
        self._buffers["coeff_B"], self._buffers["coeff_A"] = coeff_B, coeff_A  # (Module.__setattr__ would read them)
        self._mix_cache = None
        self._stale = False  # last: a concurrent reader that still sees True materialises for itself

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._stale:
            self._materialize()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):
        if self._stale:
            self._materialize()
        return super()._apply(fn, recurse)

    # ----------------------------------------------------------------- shapes
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def num_tasks(self) -> int:
        return self.log_B.num_tasks

    @property
    def k(self) -> tuple[int, int]:
        """``(k_B, k_A)``: the current sizes of the output and input bases."""
        return self.U.shape[1], self.V.shape[1]

    # --------------------------------------------------------------- training
    def begin_task(self, *, seed_rank: int | None, phi: int, init: str, generator: torch.Generator,
                   phi_init: str = "complement") -> ShareTrainState:
        """Create and attach the trainable state for a new task; returns it.

        Args:
            seed_rank: rank r of the seeding LoRA when the subspace is empty (ignored otherwise).
            phi: number of temporary directions per side, ``φ``.
            init: ``"zero"``, ``"previous"`` or ``"top"`` (:data:`INITS`, :class:`ShareTrainState`).
            generator: CPU generator for the random parts, for reproducibility.
            phi_init: how ``U⁺``, ``V⁺`` start (see :data:`PHI_INITS`): ``"complement"`` [ours]
                random orthonormal columns orthogonal to ``U``/``V``; ``"top"`` (the paper, §3.2)
                copies of the top-φ basis directions (complement columns where k < φ);
                ``"uniform"`` (the authors' code) entries drawn from U(−0.5, 0.5).

        Raises:
            ValueError: for an unknown ``init`` or ``phi_init``.
        """
        if phi_init not in PHI_INITS:
            raise ValueError(f"phi_init must be one of {PHI_INITS}, got {phi_init!r}")
        w = self.base.weight
        d_out, d_in = self.out_features, self.in_features
        if self.U.shape[1] == 0:
            if seed_rank is None:
                raise ValueError("the first task seeds the subspace with a LoRA: give its seed_rank")
            r = int(seed_rank)
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) as PEFT initialises lora_A
            A = (torch.rand(r, d_in, generator=generator) * 2 - 1) * bound
            state = ShareTrainState("seed", {"lora_B": w.new_zeros(d_out, r), "lora_A": A.to(w)})
        else:
            kb, ka = self.k
            p = self.p
            phi_b = min(phi, d_out - kb)
            phi_a = min(phi, d_in - ka)
            phi = min(phi_b, phi_a)
            std = 1.0 / math.sqrt(max(ka + phi, 1))
            previous = init == "previous" and self.num_tasks > 0
            if previous:  # ΔW_t starts at ΔW_{t-1}; E_A = E_B = 0 still get gradients since A, B ≠ 0
                cB, cA = self.coeff_B[-1].clone(), self.coeff_A[-1].clone()
            elif init in ("zero", "previous"):
                cB = w.new_zeros(kb, p)
                cA = (torch.randn(ka, p, generator=generator) * std).to(w)
            elif init == "top":  # A_t starts as the basis's top-p input directions (unit rows), B_t at zero
                cB = w.new_zeros(kb, p)
                cA = torch.eye(ka, p).to(w)
            else:
                raise ValueError(f"init must be one of {INITS}, got {init!r}")
            state = ShareTrainState("coeff", {
                "coeff_B": cB,
                "coeff_A": cA,
                "U_plus": _temporary_directions(self.U, phi, phi_init, generator).to(w),
                "V_plus": _temporary_directions(self.V, phi, phi_init, generator).to(w),
                "E_B": w.new_zeros(phi, p),
                "E_A": w.new_zeros(phi, p) if previous else (torch.randn(phi, p, generator=generator) * std).to(w),
            })
        self.train_state = state
        return state

    def begin_finetune(self, index: int) -> ShareTrainState:
        """Attach a state training only task ``index``'s coefficients on the frozen merged basis."""
        w = self.base.weight
        state = ShareTrainState("coeff", {
            "coeff_B": self.coeff_B[index].clone(),
            "coeff_A": self.coeff_A[index].clone(),
            "U_plus": w.new_zeros(self.out_features, 0),
            "V_plus": w.new_zeros(self.in_features, 0),
            "E_B": w.new_zeros(0, self.p),
            "E_A": w.new_zeros(0, self.p),
        })
        self.train_state = state
        self._finetune_index = index
        return state

    def end_finetune(self) -> None:
        """Write the fine-tuned coefficients back and drop the training state."""
        st, i = self.train_state, self._finetune_index
        if st is None or i is None:
            raise RuntimeError("no fine-tuning is open in this layer (call begin_finetune first)")
        self.set_coefficients(i, st.coeff_B.detach(), st.coeff_A.detach())
        self.train_state = None

    def trained_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training task's ``(B_t, A_t)`` without the scaling, detached."""
        if self.train_state is None:
            raise RuntimeError("no task is training in this layer")
        B, A = self.train_state.factors(self.U, self.V)
        return B.detach(), A.detach()

    def apply_merge(self, result: MergeResult) -> None:
        """Take a merge's bases and log its change of basis and the new task's coefficients
        (cast to the layer dtype); the old tasks' coefficients follow from the log."""
        if result.change_B is None or result.change_A is None:
            raise ValueError("this merge result re-projected every task instead of returning its change of basis "
                             "(merge_subspace(reproject=False) is what a layer logs)")
        dt = self.base.weight.dtype
        self.U = result.U.to(dt).contiguous()
        self.V = result.V.to(dt).contiguous()
        self.log_B.append(result.change_B, result.coeff_B[-1].to(dt))
        self.log_A.append(result.change_A, result.coeff_A[-1].to(dt))
        self.train_state = None
        self.refresh()
        self._grams = result.grams

    def merge_grams(self) -> MergeGrams:
        """The Gram matrices the next merge needs (:class:`~sharecl.subspace.MergeGrams`): as the
        last merge left them, else computed from the coefficients (float64)."""
        if self._grams is None:
            self._grams = MergeGrams.of(self.coeff_B, self.coeff_A)
        return self._grams

    def refresh(self) -> None:
        """Mark ``coeff_B`` / ``coeff_A`` for re-materialisation from the logs on first use (after
        a merge or a load)."""
        self._stale = True
        self._mix_cache = None

    def set_coefficients(self, index: int, coeff_B: torch.Tensor, coeff_A: torch.Tensor) -> None:
        """Replace task ``index``'s coefficients ``(k_B, p)`` / ``(k_A, p)`` in the current basis.
        The newest task's change stays in the log; any other folds the log into its checkpoint."""
        dt = self.base.weight.dtype
        if index == self.num_tasks - 1 and self.log_B.steps:
            self.log_B.set_last(coeff_B.to(dt))
            self.log_A.set_last(coeff_A.to(dt))
        else:
            for log, new in ((self.log_B, coeff_B), (self.log_A, coeff_A)):
                base = log.compact(dt).clone()
                base[index] = new.to(dt)
                log.base = base
        self.refresh()
        self._grams = None

    def load_logs(self, U: torch.Tensor, V: torch.Tensor, log_B: CoefficientLog, log_A: CoefficientLog) -> None:
        """Install bases and coefficient logs read from a store."""
        dt = self.base.weight.dtype
        self.U, self.V = U.to(dt).contiguous(), V.to(dt).contiguous()
        self.log_B, self.log_A = log_B, log_A
        self._materialize()  # eagerly: a loaded model (serve) is read at once, maybe from several threads
        self._grams = None

    # -------------------------------------------------------------- inference
    def task_factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``index``'s ``(B (d_out, p), A (p, d_in))``, unscaled (PEFT ``lora_B``/``lora_A``)."""
        return self.U @ self.coeff_B[index], (self.V @ self.coeff_A[index]).T

    def delta_weight(self, index: int) -> torch.Tensor:
        """``ΔW = s · U C_B C_Aᵀ Vᵀ`` ``(d_out, d_in)`` of task ``index``."""
        B, A = self.task_factors(index)
        return self.scaling * B @ A

    def folded_linear(self, index: int) -> nn.Linear:
        """A new ``nn.Linear`` with weight ``W0 + ΔW_index``: zero inference overhead."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        lin = lin.to(self.base.weight)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.delta_weight(index))
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin

    def mixing_matrices(self) -> torch.Tensor:
        """``M_t = C_B[t] C_A[t]ᵀ`` for every task, ``(T, k_B, k_A)``; cached."""
        if self._mix_cache is None or self._mix_cache.shape[0] != self.num_tasks:
            self._mix_cache = self.coeff_B @ self.coeff_A.transpose(1, 2)
        return self._mix_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.train_state is not None:
            B, A = self.train_state.factors(self.U, self.V)
            return y + self.scaling * F.linear(F.linear(x, A), B)
        route = self.router.current
        if route.row_tasks is not None:
            # y += s · ((x V) M_tᵀ) Uᵀ with M_t gathered per row: one rank-k adapter's cost.
            M = self.mixing_matrices()[route.row_tasks]  # (N, k_B, k_A)
            xv = x @ self.V  # (N, ..., k_A)
            shp = xv.shape
            z = torch.bmm(xv.reshape(shp[0], -1, shp[-1]), M.transpose(1, 2)).reshape(*shp[:-1], M.shape[1])
            return y + self.scaling * (z @ self.U.T)
        if route.task_index is not None:
            M = self.mixing_matrices()[route.task_index]
            return y + self.scaling * (((x @ self.V) @ M.T) @ self.U.T)
        return y

    def extra_repr(self) -> str:
        kb, ka = self.k
        return f"in={self.in_features}, out={self.out_features}, k_B={kb}, k_A={ka}, p={self.p}, tasks={self.num_tasks}, s={self.scaling:g}"
