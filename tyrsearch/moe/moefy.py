"""MoEfication: split a dense decoder's gated MLPs into experts and save a Mixtral-style MoE.

A Llama-family MLP is ``down(silu(gate x) * up x)`` with I intermediate neurons, and a Mixtral expert
has exactly that form with a smaller I. A partition of the I neurons into E groups of I/E therefore
turns one MLP into E experts whose outputs sum to the dense MLP's output; what is left to learn is which
experts a token needs (the router) and how to make up for the ones it skips.

Per decoder layer, in order; layer l is calibrated on what the MoE layers < l produce:

1. Activations: on the calibration tokens, the MLP's input x [T, H] (after the post-attention norm),
   its output y [T, H] and the neurons' activations a = silu(gate x) * up x [T, I].
2. Clusters (MoEfication): each neuron's pattern is |a| over a sample of tokens; balanced spherical
   k-means on these patterns (every cluster exactly I/E neurons) groups neurons that are large on the
   same tokens, so a token's large activations fall into as few experts as the model allows.
3. Router: the target is each expert's contribution norm ||down_e a_e|| per token, centred over the
   experts (only the ranking within a token matters, and the router has no bias); ridge least squares
   from x gives the router weight [E, H]. It is then scaled so that its logits differ little between
   experts: the top-k choice does not depend on the scale, and Mixtral's renormalised top-k softmax
   weights become close to 1/k (strongly unequal weights measured worse on SmolLM2).
4. Compensation: each selected expert's output is scaled by its weight (about 1/k) and the skipped
   experts' output is missing. With the router's choices and weights on the calibration tokens fixed,
   the down projections of all experts are refit jointly by ridge least squares (ridge chosen on
   held-out calibration tokens), as the pruners in `tyrsearch.local` refit down_proj. The target is
   the dense MLP's output y plus ``correct`` times the gap between the dense model's hidden states
   after this layer and the MoE's, so each layer also makes up part of the error of the layers before
   it. The refit absorbs the 1/k and whatever part of the skipped experts' output the selected
   experts' activations predict.

With top_k == E nothing is skipped: the router is zero, so every expert gets weight exactly 1/E, and
each down projection is E times its dense columns: the MoE computes the dense model's function.
Attention, norms, embeddings and the LM head are copied unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import MixtralConfig, MixtralForCausalLM

from tyrsearch.atomic import atomic_folder
from tyrsearch.calibration import LayerInputs
from tyrsearch.errors import ParameterError, UserError, mention
from tyrsearch.models import GatedMLP, adapter_for, head_dim

# Plain pre-norm decoders whose attention and MLP Mixtral reproduces exactly.
MOEFIABLE_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class MoefyConfig:
    """How the experts and routers are fitted (the defaults are what was measured best on SmolLM2)."""

    cluster_tokens: int = 8192  # calibration tokens whose activation patterns are clustered
    kmeans_iters: int = 30
    # ridges tried, relative to the Gram matrix's mean diagonal
    ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    held_out: float = 0.2  # share of calibration tokens (the last ones) on which the ridge is chosen
    router_spread: float = 0.02  # std of the router logits around each token's mean, on calibration tokens
    refit: bool = True  # refit the experts' down projections to the dense MLP output
    correct: float = 0.25  # share of the gap to the dense model's hidden states added to the refit target


def check_counts(*, experts: int, top_k: int) -> None:
    """Raise a ParameterError unless ``experts`` experts with ``top_k`` active per token make a mixture."""
    for name, value in (("experts", experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterError(name, f"must be an integer, got {value!r}")
    if experts < 2:
        raise ParameterError("experts", f"{experts}: a mixture needs at least 2 experts")
    if not 1 <= top_k <= experts:
        raise ParameterError("top_k", f"{top_k} must be between 1 and {mention('experts')} ({experts})")


def check_moefiable(config, *, experts: int, top_k: int) -> None:
    """Raise a UserError unless a dense model with this config can become a Mixtral with
    ``experts`` experts and ``top_k`` of them active per token."""
    check_counts(experts=experts, top_k=top_k)
    model_type = getattr(config, "model_type", "?")
    if model_type not in MOEFIABLE_TYPES:
        raise UserError(f"moefy turns dense {' / '.join(MOEFIABLE_TYPES)} decoders into Mixtral MoEs; "
                        f"this model is {model_type!r}: pass a dense model of one of those families")
    if config.hidden_act != "silu" or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("moefy needs a gated SiLU MLP and attention without biases, as Mixtral has; "
                        f"this model has hidden_act={config.hidden_act!r} or biases")
    if config.intermediate_size % experts:
        raise ParameterError("experts", f"{experts} does not fit: the MLP has {config.intermediate_size} neurons, not "
                                        f"divisible into {experts} equal experts; choose a divisor of "
                                        f"{config.intermediate_size}")


def mixtral_config(config, *, experts: int, top_k: int) -> MixtralConfig:
    """A Mixtral config with the dense model's attention, norms, RoPE and vocabulary, and E experts of
    intermediate_size / E neurons each."""
    return MixtralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size // experts,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=head_dim(config),
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=float(config.rms_norm_eps),
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        sliding_window=getattr(config, "sliding_window", None),
        attention_dropout=config.attention_dropout,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        rope_parameters=copy.deepcopy(config.rope_parameters),
    )


# ---------------------------------------------------------------------------------------------------------
# Clustering


def _balanced_assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Labels [N] for similarity [N, C] with exactly ``capacity`` points per cluster (N = C * capacity).

    In rounds: every unassigned point proposes to its most similar cluster that still has room, and each
    cluster accepts its most similar proposers up to its room. A round fills a cluster or assigns every
    proposer, so at most C rounds.
    """
    n, clusters = similarity.shape
    labels = torch.full((n,), -1)
    room = torch.full((clusters,), capacity)
    while (free := (labels < 0).nonzero()[:, 0]).numel():
        sim = similarity[free].masked_fill(room[None] == 0, -float("inf"))  # [free, C]
        choice = sim.argmax(dim=1)
        for cluster in choice.unique().tolist():
            proposers = (choice == cluster).nonzero()[:, 0]
            accepted = proposers[sim[proposers, cluster].argsort(descending=True)[: room[cluster]]]
            labels[free[accepted]] = cluster
            room[cluster] -= accepted.numel()
    return labels


def balanced_kmeans(features: torch.Tensor, clusters: int, *, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Cluster labels [N] of the rows of ``features`` [N, D], each label used exactly N / clusters times.

    Spherical k-means (rows and centroids unit-norm, similarity = dot product) from a random balanced
    start, with a capacity-constrained assignment; the assignment with the highest total similarity to
    its centroids is returned.
    """
    n = features.shape[0]
    if n % clusters:
        raise ValueError(f"{n} points do not split into {clusters} equal clusters")
    features = F.normalize(features.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=gen) % clusters
    best, best_score = labels, -float("inf")
    for _ in range(iters):
        centroids = F.normalize(torch.zeros(clusters, features.shape[1]).index_add_(0, labels, features), dim=1)
        similarity = features @ centroids.T  # [N, clusters]
        score = similarity.gather(1, labels[:, None]).sum().item()
        if score <= best_score:
            break
        best, best_score = labels, score
        labels = _balanced_assign(similarity, n // clusters)
    return best


# ---------------------------------------------------------------------------------------------------------
# Least squares


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, lam: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_W ||Z W - Y||^2 + lam ||W - prior||^2 given gram = Z^T Z [D, D] and rhs = Z^T Y [D, K]
    (float64), lam relative to the mean diagonal of gram. Returns W [D, K] (float64)."""
    lam = lam * gram.diagonal().mean().clamp_min(1e-12)
    if prior is not None:
        rhs = rhs + lam * prior
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)


def _normal_equations(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Z^T Z, Z^T Y and Y^T Y of z [t, D], y [t, K]: float32 products (fast), float64 results to sum."""
    return (z.T @ z).double(), (z.T @ y).double(), (y.T @ y).double()


def _validated_ridge(fit: tuple, held: tuple, ridges: tuple[float, ...], prior: torch.Tensor | None) -> torch.Tensor:
    """Solve on all tokens with the ridge that predicts the held-out tokens best.

    fit, held: (Z^T Z, Z^T Y, Y^T Y) of the fitting and the held-out tokens. The held-out squared error
    of a solution W is tr(W^T G W) - 2 tr(W^T R) + tr(Y^T Y), so no held-out token is touched again.
    """
    def held_error(w: torch.Tensor) -> float:
        gram, rhs, yy = held
        return float((w * (gram @ w)).sum() - 2 * (w * rhs).sum() + yy.trace())

    best = min(ridges, key=lambda lam: held_error(_ridge_solve(fit[0], fit[1], lam, prior)))
    return _ridge_solve(fit[0] + held[0], fit[1] + held[1], best, prior)


def _split(tokens: int, held_out: float) -> int:
    """Index of the first held-out token: the last ``held_out`` share, at least one token on each side."""
    return min(max(1, round(tokens * (1 - held_out))), tokens - 1)


def fit_router(x: torch.Tensor, scores: torch.Tensor, *, ridges: tuple[float, ...], held_out: float) -> torch.Tensor:
    """Router weight [E, H]: ridge regression of per-token expert scores [T, E], centred over the
    experts, on the router input x [T, H]; the ridge is chosen on the last ``held_out`` share of tokens."""
    target = scores - scores.mean(dim=1, keepdim=True)
    cut = _split(x.shape[0], held_out)
    fit, held = _normal_equations(x[:cut], target[:cut]), _normal_equations(x[cut:], target[cut:])
    return _validated_ridge(fit, held, ridges, None).T.float()


def refit_down(acts: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, prior: torch.Tensor, *,
               ridges: tuple[float, ...], held_out: float, chunk: int = 4096) -> torch.Tensor:
    """Down projections [H, I] of all experts, fitted jointly so that the MoE's output matches ``target``.

    acts [T, I]: activations, expert-ordered (expert e owns columns e*m..(e+1)*m); weights [T, E]: each
    expert's routing weight for the token (0 when not selected); target [T, H]; prior [H, I]: what the
    fit is shrunk towards (neurons the router never selects keep it). The ridge is chosen on the last
    ``held_out`` share of tokens.
    """
    size = acts.shape[1] // weights.shape[1]

    def sums(first: int, stop: int) -> tuple[torch.Tensor, ...]:
        total = None
        for start in range(first, stop, chunk):
            rows = slice(start, min(start + chunk, stop))
            z = acts[rows] * weights[rows].repeat_interleave(size, dim=1)  # [t, I]: what the MoE's down sees
            part = _normal_equations(z, target[rows])
            total = part if total is None else tuple(a + b for a, b in zip(total, part, strict=True))
        return total

    cut = _split(acts.shape[0], held_out)
    return _validated_ridge(sums(0, cut), sums(cut, acts.shape[0]), ridges, prior.T.double()).T.float()


# ---------------------------------------------------------------------------------------------------------
# One layer


def mlp_io(walker: LayerInputs, mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the walker's current layer once; return its MLP's inputs and outputs, each [T, H]."""
    inputs, outputs = [], []

    def keep(module, args, output):
        inputs.append(args[0].reshape(-1, args[0].shape[-1]))
        outputs.append(output.reshape(-1, output.shape[-1]))

    handle = mlp.register_forward_hook(keep)
    try:
        walker.collect({})
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(outputs)


def _tokens(hidden: list[torch.Tensor]) -> torch.Tensor:
    """The walker's hidden states [b, L, H] per chunk as one [T, H] (the order of the MLP hooks)."""
    return torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden])


def gated_activations(mlp: GatedMLP, x: torch.Tensor) -> torch.Tensor:
    """The MLP's neuron activations silu(gate x) * up x [T, I] for its inputs x [T, H]."""
    return F.silu(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)


def expert_order(acts: torch.Tensor, *, experts: int, options: MoefyConfig, seed: int) -> torch.Tensor:
    """A permutation of the I neurons: those of expert 0, then of expert 1, ... (balanced k-means on the
    neurons' |activation| patterns over a sample of the tokens of acts [T, I])."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(acts.shape[0], generator=gen)[: options.cluster_tokens]
    labels = balanced_kmeans(acts[sample].abs().T, experts, iters=options.kmeans_iters, seed=seed)
    return labels.argsort(stable=True)


def expert_scores(acts: torch.Tensor, down: torch.Tensor, experts: int) -> torch.Tensor:
    """Each expert's contribution norm ||down_e a_e|| per token [T, E], from expert-ordered activations
    acts [T, I] and down projection [H, I] (one expert at a time: [T, H])."""
    size = acts.shape[1] // experts
    return torch.stack([(acts[:, e * size:(e + 1) * size] @ down[:, e * size:(e + 1) * size].T).norm(dim=1)
                        for e in range(experts)], dim=1)


@torch.no_grad()
def _moefy_layer(mlp: GatedMLP, block: nn.Module, x: torch.Tensor, target: torch.Tensor, *, experts: int,
                 top_k: int, options: MoefyConfig, seed: int) -> None:
    """Fill the Mixtral block (router and experts) from the dense ``mlp``. x [T, H]: the MLP's calibration
    inputs; target [T, H]: what the block's output is refit to."""
    gate, up, down = mlp.gate.weight, mlp.up.weight, mlp.down.weight  # [I, H], [I, H], [H, I]
    acts = gated_activations(mlp, x)
    size = acts.shape[1] // experts
    order = expert_order(acts, experts=experts, options=options, seed=seed)
    acts, gate, up, down = acts[:, order], gate[order], up[order], down[:, order]

    experts_mod = block.experts
    # gate_up_proj [E, 2m, H]: rows 0..m-1 are the gate, m..2m-1 the up projection (chunked in forward)
    experts_mod.gate_up_proj.copy_(torch.cat([gate.view(experts, size, -1), up.view(experts, size, -1)], dim=1))
    if top_k == experts:  # nothing to choose or compensate: uniform weights 1/E
        block.gate.weight.zero_()
        experts_mod.down_proj.copy_(experts * down.view(down.shape[0], experts, size).transpose(0, 1))
        return

    scores = expert_scores(acts, down, experts)  # [T, E]
    router = fit_router(x, scores, ridges=options.ridges, held_out=options.held_out)
    logits = x @ router.T
    spread = (logits - logits.mean(dim=1, keepdim=True)).std().clamp_min(1e-12)
    block.gate.weight.copy_(router * (options.router_spread / spread))
    prior = top_k * down  # each selected expert's weight is about 1/k
    if options.refit:
        _, top_weights, top_index = block.gate(x)  # Mixtral's own routing: [T, k] each
        weights = torch.zeros(x.shape[0], experts).scatter_(1, top_index, top_weights.float())  # [T, E]
        fitted = refit_down(acts, weights, target, prior, ridges=options.ridges, held_out=options.held_out)
    else:
        fitted = prior
    experts_mod.down_proj.copy_(fitted.view(down.shape[0], experts, size).transpose(0, 1))  # [E, H, m]


# ---------------------------------------------------------------------------------------------------------
# The model


def _mixtral_shell(model: nn.Module, *, experts: int, top_k: int) -> MixtralForCausalLM:
    """A Mixtral with the dense model's attention, norms, embeddings and LM head; experts and routers
    still to be filled."""
    moe = MixtralForCausalLM(mixtral_config(model.config, experts=experts, top_k=top_k))
    shared = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(shared, strict=False)
    stray = [k for k in missing if ".mlp." not in k] + list(unexpected)
    if stray:
        raise ValueError(f"dense and Mixtral weights do not line up: {stray[:5]}")
    moe.generation_config = copy.deepcopy(model.generation_config)
    return moe.to(dtype=next(model.parameters()).dtype).eval()


@torch.no_grad()
def moefy(model: nn.Module, calibration_batches: torch.Tensor, *, experts: int, top_k: int, seed: int = 0,
          options: MoefyConfig | None = None, progress: bool = True) -> MixtralForCausalLM:
    """A Mixtral MoE with ``experts`` experts per layer, ``top_k`` active per token, built from the dense
    Llama-family ``model`` (left unchanged) and its activations on ``calibration_batches`` [n, L]."""
    options = options or MoefyConfig()
    check_moefiable(model.config, experts=experts, top_k=top_k)
    moe = _mixtral_shell(model, experts=experts, top_k=top_k)
    adapter = adapter_for(model)
    walker = LayerInputs(model, adapter, calibration_batches)
    # the dense model's own hidden states, for the refit target's correction (no refit when top_k == E)
    correcting = options.refit and options.correct and top_k < experts
    dense_walker = LayerInputs(model, adapter, calibration_batches) if correcting else None
    dense_layers, moe_layers = adapter.layers(model), moe.model.layers
    for index in tqdm(range(len(dense_layers)), desc="moefy", disable=not progress, unit="layer"):
        x, y = mlp_io(walker, dense_layers[index].mlp)
        walker.advance(recompute=False)
        target = y
        if dense_walker is not None:
            dense_walker.collect({})
            dense_walker.advance(recompute=False)
            gap = _tokens(dense_walker.hidden) - _tokens(walker.hidden)  # [T, H]: dense minus MoE hidden states
            target = y + options.correct * gap
        block = moe_layers[index].mlp
        _moefy_layer(adapter.mlp(dense_layers[index]), block, x, target, experts=experts, top_k=top_k, options=options,
                     seed=seed + index)
        # The MLP's output is added to the residual stream, so the MoE layer's output is the dense
        # layer's plus (moe(x) - y): no second pass through the attention.
        delta = torch.cat([block(part[None])[0] for part in x.split(4096)]) - y  # [T, H]
        sizes = [h.shape[0] * h.shape[1] for h in walker.hidden]
        walker.hidden = [h + d.view_as(h) for h, d in zip(walker.hidden, delta.split(sizes), strict=True)]
    return moe


def active_params(moe: MixtralForCausalLM) -> int:
    """Parameters a token runs through: everything except the experts it skips (tied weights once)."""
    config = moe.config
    skipped = 1 - config.num_experts_per_tok / config.num_local_experts
    expert_params = sum(p.numel() for layer in moe.model.layers for p in layer.mlp.experts.parameters())
    return sum(p.numel() for p in moe.parameters()) - round(skipped * expert_params)


def save_moe(moe: MixtralForCausalLM, tokenizer, out_dir: str | Path, *, result: dict | None = None) -> Path:
    """Write the MoE as an HF folder (``AutoModelForCausalLM.from_pretrained`` loads it), its tokenizer
    and ``result.json`` if given, atomically."""
    import json

    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        moe.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if result is not None:
            (tmp / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return out_dir
