"""Adapted linear layers of the peer methods: InfLoRA, SD-LoRA and DualLoRA.

Each wraps a frozen ``nn.Linear`` (``W`` ``(d_out, d_in)``) and adds the method's low-rank
branches; PEFT's names are used throughout: a down-projection ``A`` ``(r, d_in)`` and an
up-projection ``B`` ``(d_out, r)``, so a branch adds ``B A x``. Inputs are ``(..., d_in)``
float32. Every layer can accumulate its *input covariance* ``mean x xᵀ`` over non-padding
tokens (:class:`StatsLinear`), which InfLoRA and DualLoRA need between tasks. Which tokens
are real, whether to collect, and (DualLoRA) which task to compute for come from the owning
method's :class:`~sharecl.routing.Router`, never from attributes set from outside.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sharecl.routing import Router

__all__ = ["StatsLinear", "InfLoRALinear", "SDLoRALinear", "DualLoRALinear"]


class StatsLinear(nn.Module):
    """A frozen linear layer that can record its input covariance.

    Attributes:
        base: the wrapped ``nn.Linear`` (its weight may be merged into, never trained).
        router: the owning method's routing context. While its route has ``collect`` set,
            :meth:`forward` adds ``xᵀx`` of the real tokens (the route's ``token_mask``; every
            token when None) to ``cov_sum``.
    """

    def __init__(self, base: nn.Linear, router: Router | None = None):
        super().__init__()
        self.base = base
        self.router = router or Router()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.cov_sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=base.weight.device)
        self.cov_count = 0

    def _tokens(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The real tokens of ``x`` as ``(n, d_in)``."""
        if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
            return x[mask]
        return x.reshape(-1, x.shape[-1])

    def observe(self, x: torch.Tensor) -> None:
        route = self.router.current
        if route.collect:
            t = self._tokens(x.detach(), route.token_mask).double()
            self.cov_sum = self.cov_sum.to(t.device)
            self.cov_sum += t.T @ t
            self.cov_count += t.shape[0]

    def reduce_stats(self) -> None:
        """Sum ``cov_sum`` and the token count over ``torchrun`` ranks (no-op in one process)."""
        from sharecl import distributed as dist

        if dist.is_distributed():
            self.cov_sum = dist.all_reduce_sum(self.cov_sum)
            self.cov_count = int(dist.all_reduce_sum(torch.tensor([self.cov_count], dtype=torch.float64)).item())

    def covariance(self) -> torch.Tensor:
        """``C = mean_tokens x xᵀ`` ``(d_in, d_in)`` float64 since the last :meth:`reset_stats`.

        Raises:
            RuntimeError: if no token was observed.
        """
        if self.cov_count == 0:
            raise RuntimeError("no inputs were observed; run a covariance pass first")
        return self.cov_sum / self.cov_count

    def reset_stats(self) -> None:
        self.cov_sum.zero_()
        self.cov_count = 0


class InfLoRALinear(StatsLinear):
    """InfLoRA's layer (Liang & Li, CVPR 2024, Eq. 3–5): ``y = W x + B_t A_t x``.

    ``A_t`` ``(r, d_in)`` is designed before training and frozen (a buffer); ``B_t``
    ``(d_out, r)`` is zero-initialised and is the only trained adapter weight. After the
    task, :meth:`merge` folds ``B_t A_t`` into ``W`` and keeps the factors for storage.
    """

    A: torch.Tensor | None  # a buffer: the designed down-projection while a task trains

    def __init__(self, base: nn.Linear, router: Router | None = None):
        super().__init__(base, router)
        self.register_buffer("A", None)
        self.B: nn.Parameter | None = None
        self.merged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (B_t, A_t) per task

    def begin_task(self, A: torch.Tensor) -> nn.Parameter:
        """Install the designed ``A`` ``(r, d_in)``; returns the new trainable ``B`` (zeros)."""
        if A.shape[1] != self.in_features:
            raise ValueError(f"A has {A.shape[1]} input columns, the layer has {self.in_features}")
        w = self.base.weight
        self.A = A.to(w)
        self.B = nn.Parameter(w.new_zeros(self.out_features, A.shape[0]))
        return self.B

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← W + B_t A_t`` (InfLoRA, after each task); the branch is removed."""
        A, B = self.A, self.B
        if A is None or B is None:
            return
        self.base.weight += B @ A
        self.merged.append((B.detach().clone(), A.clone()))
        self.A, self.B = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        y = self.base(x)
        A, B = self.A, self.B
        if A is not None and B is not None:
            y = y + (x @ A.T) @ B.T
        return y


class SDLoRALinear(StatsLinear):
    """SD-LoRA's layer (Wu et al., ICLR 2025, Eq. 4): ``y = W0 x + Σ_k α_k D_k x + α_t s B_t A_t x``.

    Old directions ``D_k = B_k A_k`` are stored with ``‖B_k A_k‖_F = 1`` and frozen; the
    magnitudes ``α`` (one per task, shared by every layer) live in the method and are read
    from :attr:`magnitudes` at each forward. The current task's LoRA is not normalised while
    it trains (its ``B`` starts at zero, so its direction is undefined until it moves).
    """

    A_old: torch.Tensor  # buffers: the stored unit-norm directions' factors, stacked
    B_old: torch.Tensor

    def __init__(self, base: nn.Linear, scaling: float, router: Router | None = None):
        super().__init__(base, router)
        self.scaling = scaling
        self.register_buffer("A_old", base.weight.new_zeros(0, self.in_features))
        self.register_buffer("B_old", base.weight.new_zeros(self.out_features, 0))
        self.ranks: list[int] = []  # rank of each old direction
        self.magnitudes: list[nn.Parameter] = []  # set by the method: α_k (0-dim) per old task, then α_t
        self.A: nn.Parameter | None = None
        self.B: nn.Parameter | None = None

    def begin_task(self, r: int, generator: torch.Generator) -> list[nn.Parameter]:
        """A new rank-``r`` LoRA: ``A`` Kaiming-uniform (PEFT's init), ``B`` zeros."""
        bound = 1.0 / math.sqrt(self.in_features)
        A = torch.empty(r, self.in_features).uniform_(-bound, bound, generator=generator)  # CPU draw: same on every device
        w = self.base.weight
        self.A, self.B = nn.Parameter(A.to(w)), nn.Parameter(w.new_zeros(self.out_features, r))
        return [self.A, self.B]

    def current_norm(self) -> float:
        """``‖s B_t A_t‖_F`` of the current (unnormalised) update."""
        A, B = self._pair()
        return float(self.scaling * _lowrank_norm(B.detach(), A.detach()))

    def _pair(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The training task's ``(A, B)``.

        Raises:
            RuntimeError: when no task is training in this layer."""
        if self.A is None or self.B is None:
            raise RuntimeError("no task is training in this layer (call begin_task first)")
        return self.A, self.B

    @torch.no_grad()
    def freeze_current(self) -> None:
        """Store the current LoRA as a unit-norm direction and remove the trainable pair."""
        A_t, B_t = self._pair()
        B, A = B_t.detach().double(), A_t.detach().double()
        n = float(_lowrank_norm(B, A))
        scale = 1.0 / math.sqrt(n) if n > 0 else 0.0  # a zero update stays a zero "direction"
        self.A_old = torch.cat([self.A_old, (A * scale).float()], 0)
        self.B_old = torch.cat([self.B_old, (B * scale).float()], 1)
        self.ranks.append(A.shape[0])
        self.A, self.B = None, None

    def direction(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B_k, A_k)`` of old direction ``k``."""
        s = sum(self.ranks[:k])
        return self.B_old[:, s: s + self.ranks[k]], self.A_old[s: s + self.ranks[k]]

    def drop_last_direction(self) -> None:
        """Remove the most recent old direction (SD-LoRA-KD, after folding it into ``α``)."""
        r = self.ranks.pop()
        self.A_old, self.B_old = self.A_old[:-r], self.B_old[:, :-r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        y = self.base(x)
        if self.ranks:
            alpha = torch.stack(list(self.magnitudes[: len(self.ranks)]))
            cols = torch.repeat_interleave(alpha, torch.tensor(self.ranks, device=alpha.device))
            y = y + ((x @ self.A_old.T) * cols) @ self.B_old.T
        A, B = self.A, self.B
        if A is not None and B is not None:
            y = y + self.magnitudes[len(self.ranks)] * self.scaling * ((x @ A.T) @ B.T)
        return y


def _lowrank_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``‖B A‖_F`` from the small Gram matrices, without forming ``B A``."""
    return torch.sqrt(torch.clamp(torch.trace((B.T @ B) @ (A @ A.T)), min=0.0))


class DualLoRALinear(StatsLinear):
    """DualLoRA's layer ([ours] after Chen et al., arXiv 2411.00623; METHODS.md §4).

    ``y = W x + s B_O A_O x + Σ_t w_t(x) R_t U_t x`` where

    - ``(A_O, B_O)`` is the orthogonal adapter: trained on each task with its down-projection
      parametrised as ``A_O (I − M Mᵀ)`` (rows stay in ``M^⊥``, the memory of earlier tasks'
      inputs), merged into ``W`` after the task (so one adapter is shared by all tasks);
    - ``U_t`` ``(r_res, d_in)`` (orthonormal rows, frozen) are task t's own input
      directions and ``R_t`` ``(d_out, r_res)`` its trained residual up-projection;
    - ``w(x)`` ``(N, T)`` are the dynamic-memory weights: one-hot on the known task in
      training and task-incremental inference (the route's ``task_index``), and in class-incremental
      inference a softmax over tasks of the relevance ``ρ_t = e_t(x)/ē_t`` divided by a
      temperature, where ``e_t(x)`` is the share of the sequence's input energy inside
      ``U_t`` (over its real tokens) and ``ē_t`` the same share on task t's training data.
    """

    U: torch.Tensor  # buffers: the residual bases U_t and frozen up-projections R_t, stacked
    R: torch.Tensor

    def __init__(self, base: nn.Linear, scaling: float, router: Router | None = None, temperature: float = 0.1):
        super().__init__(base, router)
        self.scaling = scaling
        self.temperature = float(temperature)
        self.register_buffer("U", base.weight.new_zeros(0, self.in_features))  # stacked U_t
        self.register_buffer("R", base.weight.new_zeros(self.out_features, 0))  # stacked frozen R_t
        self.res_ranks: list[int] = []
        self.energy_mean: list[float] = []  # ē_t
        self.A_O: nn.Parameter | None = None
        self.B_O: nn.Parameter | None = None
        self.memory_basis = base.weight.new_zeros(self.in_features, 0)  # M while a task trains
        self.R_cur: nn.Parameter | None = None
        self.merged: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin_task(self, r: int, U_t: torch.Tensor, memory: torch.Tensor, generator: torch.Generator) -> list[nn.Parameter]:
        """Start task t: orthogonal pair (``A_O`` random in ``M^⊥``, ``B_O`` zeros) and ``R_t`` zeros.

        Args:
            r: rank of the orthogonal adapter.
            U_t: ``(r_res, d_in)`` orthonormal rows, task t's residual basis.
            memory: ``M`` ``(d_in, m)`` orthonormal, float64: earlier tasks' input space.
        """
        bound = 1.0 / math.sqrt(self.in_features)
        A = torch.empty(r, self.in_features).uniform_(-bound, bound, generator=generator).double()
        P = memory.double().cpu()
        A = A - (A @ P) @ P.T
        w = self.base.weight
        self.A_O = nn.Parameter(A.to(w))
        self.B_O = nn.Parameter(w.new_zeros(self.out_features, r))
        self.memory_basis = P.to(w)
        self.U = torch.cat([self.U, U_t.to(w)], 0)
        self.res_ranks.append(U_t.shape[0])
        self.R_cur = nn.Parameter(w.new_zeros(self.out_features, U_t.shape[0]))
        return [self.A_O, self.B_O, self.R_cur]

    def orthogonal_down(self) -> torch.Tensor:
        """The effective down-projection ``A_O (I − M Mᵀ)`` ``(r, d_in)``.

        Parametrising through the projector (rather than projecting gradients, which Adam's
        per-coordinate scaling would undo) keeps every update exactly zero on ``M``.
        """
        if self.A_O is None:
            raise RuntimeError("no task is training in this layer (call begin_task first)")
        M = self.memory_basis
        return self.A_O if M.shape[1] == 0 else self.A_O - (self.A_O @ M) @ M.T

    @torch.no_grad()
    def end_task(self, energy_mean: float) -> None:
        """Merge the orthogonal adapter into ``W``; freeze ``R_t``; record ``ē_t``."""
        A, B_O, R_cur = self.orthogonal_down().detach(), self.B_O, self.R_cur
        if B_O is None or R_cur is None:
            raise RuntimeError("no task is training in this layer (call begin_task first)")
        self.base.weight += self.scaling * (B_O @ A)
        self.merged.append((B_O.detach().clone(), A.clone()))
        self.R = torch.cat([self.R, R_cur.detach()], 1)
        self.energy_mean.append(energy_mean)
        self.A_O = self.B_O = self.R_cur = None

    def energies(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``e_t(x)`` ``(N, T)``: share of each sequence's input energy (summed over its real
        tokens) inside each ``U_t``; ``ē_t = tr(U_t C U_tᵀ)/tr(C)`` is the same share on the task's data."""
        z = x @ self.U.T
        per_task = torch.stack([c.pow(2).sum(-1) for c in z.split(self.res_ranks, -1)], -1)  # (N, L, T) or (N, T)
        total = x.pow(2).sum(-1, keepdim=True)
        if x.dim() == 3:
            if token_mask is not None and token_mask.shape == x.shape[:2]:
                m = token_mask.to(x.dtype).unsqueeze(-1)
                per_task, total = per_task * m, total * m
            per_task, total = per_task.sum(1), total.sum(1)
        return per_task / total.clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        y = self.base(x)
        if self.A_O is not None and self.B_O is not None:
            y = y + self.scaling * ((x @ self.orthogonal_down().T) @ self.B_O.T)
        T = len(self.res_ranks)
        if T == 0:
            return y
        R = self.R if self.R_cur is None else torch.cat([self.R, self.R_cur], 1)
        route = self.router.current
        if route.task_index is not None:  # known task: its residual adapter alone
            s = sum(self.res_ranks[: route.task_index])
            sl = slice(s, s + self.res_ranks[route.task_index])
            return y + (x @ self.U[sl].T) @ R[:, sl].T
        ebar = torch.tensor(self.energy_mean[:T] + [1.0] * (T - len(self.energy_mean)), device=x.device)
        rho = self.energies(x, route.token_mask) / ebar.clamp_min(1e-12)
        if route.relevance is not None:  # the method asked for this forward's relevance (task identification)
            route.relevance.append(rho.detach())
        w = torch.softmax(rho / self.temperature, -1)  # (N, T)
        cols = torch.repeat_interleave(w, torch.tensor(self.res_ranks, device=x.device), dim=-1)  # (N, Σr)
        if x.dim() == 3:
            cols = cols.unsqueeze(1)
        return y + ((x @ self.U.T) * cols) @ R.T
