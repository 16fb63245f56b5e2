"""Face-recognition heads: thin layers over the fused op with their papers' defaults.

Each is an L2SoftmaxLoss with normalized class weights, alpha = s (the papers' scale), and its margin
as the op's combined margin f(c) = cos(arccos(c) + m2) - m3 on the target column
(docs/design.md, "The margins"). The per-sample heads (AdaFace, MagFace, ElasticFace) compute their
(B,) margins from the features before normalization (their norms: O(B D), no pass over the classes)
and hand them to the op, which applies them in the same pass as every other margin; no gradient
flows through a margin.

Where a head differs from its reference implementation, the docstring says so. Common to all: past
arccos(c) + m2 >= pi the op uses the monotonic fallback c - m2 sin(m2) - m3 (InsightFace's), where
some papers' code clips the angle instead; only target cosines below -cos(m2) (about -0.88 at
m2 = 0.5) are affected.

Every head takes L2SoftmaxLoss's keywords (bias, subcenters, margin_grad, sample_rate, backend,
max_logits_bytes, ...) through **kwargs.
"""
from __future__ import annotations

import math

import torch

from .loss import reduce_rows
from .loss_module import L2SoftmaxLoss
from .options import _check_margin_value


class CombinedMarginLoss(L2SoftmaxLoss):
    """InsightFace's combined margin (arcface_torch's CombinedMarginLoss, margin_list = (m1, m2, m3)):
    target logit s (cos(m1 theta + m2) - m3) with m1 = 1 (multiplicative margins are not supported).
    ArcFace is (1, 0.5, 0), CosFace (1, 0, 0.35) or (1, 0, 0.4) (InsightFace's WebFace42M recipe).

    InsightFace applies the margin under no_grad (the gradient as if there were none):
    margin_grad="detached" reproduces that; the default "exact" differentiates it."""

    def __init__(self, in_features: int, num_classes: int, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 s: float = 64.0, **kwargs):
        self.s = s
        super().__init__(in_features, num_classes, alpha=s, normalize_weight=True, margin_type="combined",
                         margin=(m1, m2, m3), **kwargs)

    def head_config(self) -> dict:
        return {"s": self.s}

    def set_margin(self, margin) -> None:
        """A new combined margin (m1, m2, m3) (m1 = 1.0; m2, m3 numbers or 0-d tensors: a warm-up schedule)."""
        if not isinstance(margin, (tuple, list)):
            raise TypeError(f"{type(self).__name__}.set_margin takes the combined margin (m1, m2, m3), "
                            f"got {margin!r}")
        super().set_margin(tuple(margin))


class ArcFaceLoss(CombinedMarginLoss):
    """ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR
    2019): target logit s cos(theta + m), s = 64, m = 0.5. With subcenters=K (K = 3 in the paper's
    ECCV 2020 follow-up) it is sub-center ArcFace."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5, **kwargs):
        super().__init__(in_features, num_classes, m1=1.0, m2=m, m3=0.0, s=s, **kwargs)

    def set_margin(self, m) -> None:
        """A new angular margin m (a number in [0, pi), or a 0-d tensor: a warm-up schedule under
        torch.compile): the target logit becomes s cos(theta + m)."""
        super().set_margin((1.0, _head_margin(self, m, upper=True), 0.0))


class CosFaceLoss(CombinedMarginLoss):
    """CosFace / AM-softmax (Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face
    Recognition", CVPR 2018): target logit s (cos theta - m), s = 64, m = 0.35."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.35, **kwargs):
        super().__init__(in_features, num_classes, m1=1.0, m2=0.0, m3=m, s=s, **kwargs)

    def set_margin(self, m) -> None:
        """A new cosine margin m (a number >= 0, or a 0-d tensor: a warm-up schedule under torch.compile):
        the target logit becomes s (cos theta - m)."""
        super().set_margin((1.0, 0.0, _head_margin(self, m)))


def _head_margin(head, m, upper: bool = False):
    """A fixed-margin head's m for set_margin: a number (checked) or a 0-d floating tensor, with an error
    naming the head's own argument (not the combined form it is stored as)."""
    name = f"{type(head).__name__}.set_margin: m"
    if isinstance(m, (tuple, list)):
        raise TypeError(f"{name} is the head's one margin (a number or a 0-d tensor), got {m!r}; "
                        "a combined (m1, m2, m3) margin is CombinedMarginLoss's")
    if isinstance(m, torch.Tensor) and m.dim() != 0:
        raise ValueError(f"{name} as a tensor must be 0-d (per-row margins are the per-sample heads'), "
                         f"got shape {tuple(m.shape)}")
    return _check_margin_value(name, m, upper=upper)


def _no_set_margin(head, what: str):
    raise TypeError(f"{type(head).__name__} computes its margins per sample ({what}); set_margin does not apply: "
                    "change the head's hyperparameters instead")


class AdaFaceLoss(L2SoftmaxLoss):
    """AdaFace (Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022).

    The feature norm |x_i| (clipped to [0.001, 100]) is the image-quality proxy. Its batch mean and
    standard deviation update exponential moving averages (t_alpha = 0.01; buffers start at 20 and
    100, as the reference code; updated in training mode only), and
        g_i = clip(h (|x_i| - mean) / (std + eps), -1, 1),   h = 0.333
        target logit = s (cos(theta + g_angle) - g_add),  g_angle = -m g_i,  g_add = m + m g_i,  m = 0.4
    i.e. per-row margins m2 = -m g_i (negative for high-quality rows) and m3 = m + m g_i.
    The reference code clips theta + g_angle to [eps, pi - eps]; the op does not clip below (rows with
    theta < m g_i: cos(theta - m g_i) instead of cos(eps)) and uses the monotonic fallback above."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.4, h: float = 0.333,
                 t_alpha: float = 0.01, eps: float = 1e-3, **kwargs):
        self.s, self.m, self.h, self.t_alpha, self.norm_eps = s, m, h, t_alpha, eps
        kw_device = kwargs.get("device")
        super().__init__(in_features, num_classes, alpha=s, normalize_weight=True, margin_type="combined",
                         margin=(1.0, 0.0, 0.0), **kwargs)
        self.register_buffer("batch_mean", torch.full((), 20.0, device=kw_device))
        self.register_buffer("batch_std", torch.full((), 100.0, device=kw_device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "batch_mean"):
            self.batch_mean.fill_(20.0)
            self.batch_std.fill_(100.0)

    @torch.no_grad()
    def margin_scaler(self, features: torch.Tensor) -> torch.Tensor:
        """g_i of the docstring (updating the moving averages first in training mode)."""
        return self.scaler_from_norms(self.clipped_norms(features))

    @staticmethod
    def clipped_norms(features: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(features.detach().float(), dim=1).clamp(0.001, 100.0)

    @torch.no_grad()
    def scaler_from_norms(self, norms: torch.Tensor) -> torch.Tensor:
        """g_i from the batch's clipped norms (the class-parallel head passes the global batch's)."""
        if self.training and norms.numel() > 1:
            t = self.t_alpha
            self.batch_mean.mul_(1 - t).add_(t * norms.mean())
            self.batch_std.mul_(1 - t).add_(t * norms.std())
        return ((norms - self.batch_mean) / (self.batch_std + self.norm_eps) * self.h).clamp(-1.0, 1.0)

    def set_margin(self, margin) -> None:
        _no_set_margin(self, "from the feature norms, with m, h")

    def batch_margin(self, features, target):
        g = self.margin_scaler(features)
        return (1.0, -self.m * g, self.m + self.m * g)

    def head_config(self) -> dict:
        return {"s": self.s, "m": self.m, "h": self.h, "t_alpha": self.t_alpha, "eps": self.norm_eps}


class MagFaceLoss(L2SoftmaxLoss):
    """MagFace (Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
    Assessment", CVPR 2021). The feature magnitude a_i = clip(|x_i|, l_a, u_a) sets an angular margin
        m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a) + l_m        (l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8)
    (target logit s cos(theta + m(a)), s = 64) and a regularizer g(a) = 1 / a + a / u_a^2 is added with
    weight lambda_g = 35: loss_i = CE_i + lambda_g g(a_i).

    Both terms reach the magnitude, as in the paper: g pulls a up towards u_a, the margin (larger for a
    larger a) pushes a hard sample's magnitude down; their balance is what makes a a quality score. The
    op's margins carry no gradient, so the margin's part is restored here from per-row values: with
    c_i the target cosine (one gather of the target rows, O(B D)) and p_i = exp(-CE_i) the target's
    probability, dCE_i / dm_i = s (p_i - 1) df/dm (df/dm = -sin(theta + m) on the angular branch,
    -(sin m + m cos m) on the fallback), applied through a zero-valued term c_i (m - m.detach()).
    No label smoothing (p_i would not follow from CE_i)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                 l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0, **kwargs):
        if kwargs.get("label_smoothing", 0.0) != 0.0:
            raise ValueError("MagFaceLoss does not take label_smoothing (its margin gradient needs p_y = exp(-CE))")
        self.s, self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = s, l_a, u_a, l_m, u_m, lambda_g
        super().__init__(in_features, num_classes, alpha=s, normalize_weight=True, margin_type="combined",
                         margin=(1.0, 0.0, 0.0), **kwargs)

    def set_margin(self, margin) -> None:
        _no_set_margin(self, "from the feature magnitudes, with l_m, u_m")

    def magnitude(self, features: torch.Tensor) -> torch.Tensor:
        """a = clip(|x|, l_a, u_a) in float32, float64 for float64 features (so gradcheck runs on the head)."""
        return torch.linalg.vector_norm(features.to(_wide(features)), dim=1).clamp(self.l_a, self.u_a)

    def margin_of(self, a: torch.Tensor) -> torch.Tensor:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def regularizer(self, a: torch.Tensor) -> torch.Tensor:
        return 1.0 / a + a / self.u_a ** 2

    def batch_margin(self, features, target):
        return (1.0, self.margin_of(self.magnitude(features.detach())), 0.0)

    @torch.no_grad()
    def _margin_slope(self, features, target, m, ce):
        """dCE_i / dm_i (0 on ignored rows), from the target cosine and p_y = exp(-CE_i)."""
        valid = target != self.options.ignore_index
        y = torch.where(valid, target, torch.zeros_like(target))
        K = self.options.subcenters
        rows = (y[:, None] * K + torch.arange(K, device=y.device)).reshape(-1)
        dt = torch.promote_types(_wide(features), _wide(self.weight))  # float64 inputs: gradcheck runs
        w = torch.nn.functional.normalize(self.weight.detach().to(dt).index_select(0, rows), dim=1)
        x = torch.nn.functional.normalize(features.detach().to(dt), dim=1, eps=self.options.eps)
        c = (w.view(-1, K, w.shape[1]) * x[:, None, :]).sum(2).amax(1)
        return magface_margin_slope(c, m, ce, self.s, valid)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a = self.magnitude(features)
        m = self.margin_of(a)
        ce = self._loss(features, target, (1.0, m.detach(), 0.0), "none")
        valid = target != self.options.ignore_index
        margin_term = self._margin_slope(features, target, m.detach(), ce) * (m - m.detach())  # value 0
        rows = ce + (torch.where(valid, self.lambda_g * self.regularizer(a), torch.zeros_like(a))
                     + margin_term).to(ce.dtype)
        return reduce_rows(rows, target, self.options.ignore_index, self.reduction)

    def head_config(self) -> dict:
        return {"s": self.s, "l_a": self.l_a, "u_a": self.u_a, "l_m": self.l_m, "u_m": self.u_m,
                "lambda_g": self.lambda_g}


@torch.no_grad()
def magface_margin_slope(c: torch.Tensor, m: torch.Tensor, ce: torch.Tensor, s: float, valid: torch.Tensor):
    """MagFace's dCE_i / dm_i (0 on ignored rows) from the target cosines c, the margins m and the
    per-row CE (p_y = exp(-CE_i)): s (p_i - 1) df/dm, df/dm = -sin(theta + m) on the angular branch,
    -(sin m + m cos m) on the fallback. In float64 when c is float64 (float64 inputs: gradcheck runs), else
    in float32."""
    dt = _wide(c)
    theta = torch.acos(c.to(dt).clamp(-1.0, 1.0))
    df = torch.where(theta + m < math.pi, -torch.sin(theta + m), -(torch.sin(m) + m * torch.cos(m)))
    p = torch.exp(-ce.detach().to(dt))
    return torch.where(valid, s * (p - 1) * df, torch.zeros_like(df))


class ElasticFaceLoss(L2SoftmaxLoss):
    """ElasticFace (Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition", CVPR
    Workshops 2022): each sample's margin is drawn from N(m, std^2) every step. variant "arc":
    s cos(theta + m_i), m = 0.5; variant "cos": s (cos theta - m_i), m = 0.35; std = 0.05 and s = 64 for
    both (the reference configurations). The draw uses `generator` (torch's default when None)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float | None = None,
                 std: float = 0.05, variant: str = "arc", **kwargs):
        if variant not in ("arc", "cos"):
            raise ValueError(f"variant must be 'arc' or 'cos', got {variant!r}")
        self.s, self.variant, self.std = s, variant, std
        self.m = (0.5 if variant == "arc" else 0.35) if m is None else m
        super().__init__(in_features, num_classes, alpha=s, normalize_weight=True, margin_type="combined",
                         margin=(1.0, 0.0, 0.0), **kwargs)

    def set_margin(self, m) -> None:
        """A new mean margin m (a number >= 0; the draws are N(m, std^2)): a warm-up schedule."""
        if isinstance(m, torch.Tensor) or isinstance(m, (tuple, list)):
            raise TypeError(f"ElasticFaceLoss.set_margin: m is the mean of the drawn margins, a number, got {m!r}")
        self.m = _check_margin_value("ElasticFaceLoss.set_margin: m", m, upper=self.variant == "arc")

    def draw_margins(self, batch: int, device) -> torch.Tensor:
        if self.generator is not None and torch.compiler.is_compiling():
            raise ValueError("ElasticFaceLoss: torch.compile cannot trace a torch.Generator (head.generator); under "
                             "torch.compile set head.generator = None (torch's default generator)")
        with torch.no_grad():
            return torch.normal(self.m, self.std, (batch,), generator=self.generator, device=device)

    def batch_margin(self, features, target):
        m = self.draw_margins(features.shape[0], features.device)
        return (1.0, m, 0.0) if self.variant == "arc" else (1.0, 0.0, m)

    def head_config(self) -> dict:
        return {"s": self.s, "m": self.m, "std": self.std, "variant": self.variant}


def _wide(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, else float32 (16-bit inputs are widened)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def target_cosines(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, subcenters: int,
                   eps: float, valid: torch.Tensor) -> torch.Tensor:
    """cos theta_y of each row (the maximum over the target class's sub-centers), fp32, from one gather
    of the target rows of W (O(B D), no pass over the classes); 0 on rows that are not valid."""
    K = subcenters
    y = torch.where(valid, target, torch.zeros_like(target))
    rows = (y[:, None] * K + torch.arange(K, device=y.device)).reshape(-1)
    w = torch.nn.functional.normalize(weight.detach().float().index_select(0, rows), dim=1)
    x = torch.nn.functional.normalize(features.detach().float(), dim=1, eps=eps)
    c = (w.view(-1, K, w.shape[1]) * x[:, None, :]).sum(2).amax(1).clamp(-1.0, 1.0)
    return torch.where(valid, c, torch.zeros_like(c))


class CurricularFaceLoss(L2SoftmaxLoss):
    """CurricularFace (Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
    Recognition", CVPR 2020): the ArcFace target logit s cos(theta_y + m) (s = 64, m = 0.5, the
    monotonic fallback cos theta_y - m sin m past pi - m as its code), and every negative harder than
    it, cos theta_j > cos(theta_y + m), re-weighted as N(t, cos theta_j) = cos theta_j (t + cos theta_j):
    the op's negatives="curricular" (the mask a constant, t without gradient, as the paper's code).

    t is the adaptive parameter, an exponential moving average of the batch's mean target cosine:
        t <- 0.01 mean_i cos theta_{y_i} + 0.99 t      (t starts at 0)
    updated under no_grad at each training-mode forward before the loss uses it (as the paper's code;
    eval mode leaves it), over the rows whose target is not ignore_index; a buffer "t" in the state_dict.
    Early in training t ~ 0 and a hard negative's logit shrinks (easy samples first); as t grows
    towards the mean cosine the hard negatives weigh more."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 momentum: float = 0.01, **kwargs):
        self.s, self.m, self.momentum = s, m, momentum
        kw_device = kwargs.get("device")
        super().__init__(in_features, num_classes, alpha=s, normalize_weight=True, margin_type="arcface",
                         margin=m, negatives="curricular", negatives_t=0.0, **kwargs)
        self.register_buffer("t", torch.zeros((), device=kw_device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "t"):
            self.t.zero_()

    @torch.no_grad()
    def update_t(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """t <- momentum mean(cos theta_y) + (1 - momentum) t over the rows with a target."""
        valid = target != self.options.ignore_index
        c = target_cosines(features, self.weight, target, self.options.subcenters, self.options.eps, valid)
        n = valid.sum().double()
        mean = torch.where(n > 0, c.double().sum() / n.clamp_min(1), self.t.double())  # all ignored: t stays
        self.t.copy_(((1 - self.momentum) * self.t.double() + self.momentum * mean).to(self.t.dtype))

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_t(features, target)
        return super().forward(features, target)

    def batch_negatives_t(self):
        return self.t.detach().clone()  # a 0-d tensor: no recompile as t changes, no host sync

    def head_config(self) -> dict:
        return {"s": self.s, "m": self.m, "momentum": self.momentum}


class MVSoftmaxLoss(L2SoftmaxLoss):
    """MV-Softmax (Wang et al., "Mis-classified Vector Guided Softmax Loss for Face Recognition", AAAI
    2020), the fixed variant: a negative is "mis-classified" when cos theta_j > f(m, theta_y), the margined
    target, and its logit becomes s (t cos theta_j + t - 1) (the paper's h(t, theta_j, I_j) =
    exp(s (t - 1)(cos theta_j + 1) I_j) times exp(s cos theta_j)): the op's negatives="mv".
    margin_type "am" (MV-AM-Softmax: f = cos theta_y - m, m = 0.35) or "arc" (MV-Arc-Softmax:
    f = cos(theta_y + m), m = 0.5); s = 32 and t = 1.2, the paper's settings."""

    def __init__(self, in_features: int, num_classes: int, s: float = 32.0, margin_type: str = "am",
                 m: float | None = None, t: float = 1.2, **kwargs):
        if margin_type not in ("am", "arc"):
            raise ValueError(f"margin_type must be 'am' or 'arc', got {margin_type!r}")
        self.s, self.variant, self.t = s, margin_type, t
        self.m = (0.35 if margin_type == "am" else 0.5) if m is None else m
        super().__init__(in_features, num_classes, alpha=s, normalize_weight=True,
                         margin_type="cosface" if margin_type == "am" else "arcface", margin=self.m,
                         negatives="mv", negatives_t=t, **kwargs)

    def head_config(self) -> dict:
        return {"s": self.s, "m": self.m, "t": self.t, "margin_type": self.variant}


HEADS = {"softmax-l2": L2SoftmaxLoss, "arcface": ArcFaceLoss, "cosface": CosFaceLoss,
         "combined": CombinedMarginLoss, "adaface": AdaFaceLoss, "magface": MagFaceLoss,
         "elasticface": ElasticFaceLoss, "curricularface": CurricularFaceLoss, "mv-softmax": MVSoftmaxLoss}

__all__ = ["AdaFaceLoss", "ArcFaceLoss", "CombinedMarginLoss", "CosFaceLoss", "CurricularFaceLoss", "ElasticFaceLoss",
           "MVSoftmaxLoss", "MagFaceLoss", "HEADS"]
