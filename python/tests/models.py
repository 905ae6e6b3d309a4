"""The numpy models of the pipeline and expert-parallel tests, importable both by the
test process and by the peer processes of `tests/peers/` (which put this directory on
their path), so that a run across processes and its single-process reference execute the
very same code.

Pipeline (issue 12): an MLP of 8 linear layers with a leaky ReLU, B (input gradient) and
W (weight gradient) computed separately, trained by `phalanx.PipelineRunner`; `reference`
is the single-process run with the same micro-batch accumulation order (the
model tests/test_pipeline.py trains).

MoE (issue 13): a gate and 8 experts, each a small MLP y = W2 relu(W1 x), top-1 and top-2
routing with a Zipf-skewed gate; `moe_device_step` is one device's forward and backward
through `phalanx.ExpertLayer`, `moe_dense_reference` the single-process dense reference
with the same fixed accumulation order (the model tests/test_moe.py checks).
"""

import numpy as np

import phalanx

# ---------------------------------------------------------------------------------------
# Pipeline: an MLP of 8 linear layers over P stages.

LAYERS, D, ROWS, M, P, ITERS, LR = 8, 6, 3, 8, 4, 3, np.float32(0.05)
_RNG = np.random.default_rng(12)
X = _RNG.uniform(-1, 1, (M, ROWS, D)).astype(np.float32)
TARGET = _RNG.uniform(-1, 1, (M, ROWS, D)).astype(np.float32)
W0 = (_RNG.uniform(-1, 1, (LAYERS, D, D)) * 0.5).astype(np.float32)


def act(layer, z):
    """Leaky ReLU on every layer but the last."""
    return z if layer + 1 == LAYERS else np.where(z > 0, z, np.float32(0.01) * z)


def act_grad(layer, z):
    return np.ones_like(z) if layer + 1 == LAYERS else np.where(z > 0, np.float32(1), np.float32(0.01))


def layer_forward(layer, w, x):
    z = x @ w
    return act(layer, z), z


def layer_backward_input(layer, w, z, dy):
    """B: dz = dy * act'(z), dL/dx = dz @ W^T."""
    dz = dy * act_grad(layer, z)
    return dz @ w.T, dz


def weight_grad(x, dz):
    """W: dL/dW = x^T @ dz."""
    return x.T @ dz


def step_weights(weights, grads):
    """SGD on the gradients summed over micro-batches in order 0..M-1; returns the sums."""
    sums = np.zeros((LAYERS, D, D), dtype=np.float32)
    for layer in range(LAYERS):
        for mb in range(M):
            sums[layer] += grads[layer, mb]
        weights[layer] -= LR * sums[layer]
    return sums


def backprop(w, x, target):
    """One micro-batch x through every layer of weights w and back, in one process: each
    layer's weight gradient, by layer."""
    cache = []
    for layer in range(LAYERS):
        y, z = layer_forward(layer, w[layer], x)
        cache.append((x, z))
        x = y
    dy = x - target
    grads = [None] * LAYERS
    for layer in reversed(range(LAYERS)):
        xin, z = cache[layer]
        dy, dz = layer_backward_input(layer, w[layer], z, dy)
        grads[layer] = weight_grad(xin, dz)
    return grads


def reference(iterations=ITERS):
    """The single-process run: each iteration's gradient sums and the weights after it."""
    w = W0.copy()
    out = []
    for _ in range(iterations):
        grads = {}
        for mb in range(M):
            for layer, g in enumerate(backprop(w, X[mb], TARGET[mb])):
                grads[layer, mb] = g
        sums = step_weights(w, grads)
        out.append((sums, w.copy()))
    return out


class MlpStage:
    """The layers of one stage's chunks (virtual stage v of V holds layers v*8/V ...)."""

    def __init__(self, x=X, t=TARGET):
        self.weights = W0.copy()  # every layer; this stage touches only its own
        self.x, self.t = x, t  # the micro-batches' inputs and targets
        self.cache, self.dz, self.out, self.grads = {}, {}, {}, {}
        self.seen = set()

    def layers(self, step):
        per = LAYERS // step.virtual_stages
        return range(step.virtual_stage * per, (step.virtual_stage + 1) * per)

    def input_len(self, step):
        return ROWS * D

    def output_len(self, step):
        return ROWS * D

    def forward(self, step, x):
        assert x.dtype == np.float32 and x.shape == ((0,) if step.is_first else (ROWS * D,))
        self.seen.update(self.layers(step))
        x = self.x[step.mb] if step.is_first else x.reshape(ROWS, D)
        cache = []
        for layer in self.layers(step):
            y, z = layer_forward(layer, self.weights[layer], x)
            cache.append((layer, x, z))
            x = y
        self.cache[step.virtual_stage, step.mb] = cache
        if step.is_last:
            self.out[step.mb] = x
            return None
        return x.ravel()

    def backward_input(self, step, grad):
        dy = self.out.pop(step.mb) - self.t[step.mb] if step.is_last else grad.reshape(ROWS, D)
        for layer, x, z in reversed(self.cache.pop((step.virtual_stage, step.mb))):
            dy, dz = layer_backward_input(layer, self.weights[layer], z, dy)
            self.dz[layer, step.mb] = (x, dz)
        return None if step.is_first else dy.ravel()

    def backward_weight(self, step):
        for layer in self.layers(step):
            x, dz = self.dz.pop((layer, step.mb))
            self.grads[layer, step.mb] = weight_grad(x, dz)

    def step(self):
        """SGD over this iteration's gradients (zeros for the other stages' layers);
        returns the gradient sums and forgets the gradients."""
        zero = np.zeros((D, D), np.float32)
        sums = step_weights(self.weights, {k: self.grads.get(k, zero) for k in np.ndindex(LAYERS, M)})
        self.grads.clear()
        return sums

    def idle(self):
        """Whether nothing of an iteration is left over (caches, gradients in flight)."""
        return not self.cache and not self.dz and not self.out


class FusedMlpStage(MlpStage):
    """With a fused backward (what 1F1B's BW passes call when it exists)."""

    fused = 0

    def backward(self, step, grad):
        self.fused += 1
        g = self.backward_input(step, grad)
        self.backward_weight(step)
        return g


# ---------------------------------------------------------------------------------------
# MoE: a gate and 8 MLP experts on N devices. Every sum runs in one fixed order on both
# sides (each expert's per-token gradients added on each holder in arrival order, tokens
# by source device, then expert, then their order there; the holders' sums added in
# ascending device order by spRS), as tests/moe_layer.rs does.

N = 4  # devices
H, F, E, T = 4, 8, 8, 24  # hidden, the experts' inner width, experts, tokens per device
W = 2 * H * F  # W1 (F x H) then W2 (H x F)
ZIPF_ORDER = [5, 2, 7, 0, 3, 6, 1, 4]  # the expert of popularity rank 1, 2, ...
OWNERS = [e // 2 for e in range(E)]


def expert_weights(e):
    return np.random.default_rng(100 + e).standard_normal(W).astype(np.float32)


def inputs(d):
    """Device d's tokens x (T x H) and the loss's upstream gradients c (T x H)."""
    rng = np.random.default_rng(200 + d)
    return rng.standard_normal((T, H)).astype(np.float32), rng.standard_normal((T, H)).astype(np.float32)


def gate(d, k):
    """Each token's k experts and weights: logits x Wg plus a Zipf(1.2) prior, top-k,
    weights the softmax over the chosen logits."""
    x, _ = inputs(d)
    wg = (2.0 * np.random.default_rng(7).standard_normal((H, E))).astype(np.float32)
    prior = np.zeros(E, dtype=np.float32)
    for rank, e in enumerate(ZIPF_ORDER):
        prior[e] = -1.2 * np.log(rank + 1.0)
    logits = x @ wg + prior
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, chosen, axis=1)
    g = np.exp(top - top.max(axis=1, keepdims=True))
    return chosen, (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def rows(d, k):
    """Device d's rows, one per token and choice (token-major): (token, gate weight)
    pairs and the rows' experts."""
    chosen, g = gate(d, k)
    picks = [(i, g[i, j]) for i in range(T) for j in range(k)]
    return picks, [int(chosen[i, j]) for i in range(T) for j in range(k)]


def mlp(w, x):
    """(y, z) with z = W1 x and y = W2 relu(z), each dot product summed in index order."""
    w1, w2 = w[: F * H].reshape(F, H), w[F * H :].reshape(H, F)
    z = np.zeros(F, dtype=np.float32)
    for j in range(H):
        z = z + w1[:, j] * x[j]
    a = np.maximum(z, np.float32(0))
    y = np.zeros(H, dtype=np.float32)
    for j in range(F):
        y = y + w2[:, j] * a[j]
    return y, z


def mlp_backward(w, x, dy):
    """(dW, dx) of one token given dy."""
    _, z = mlp(w, x)
    w1, w2 = w[: F * H].reshape(F, H), w[F * H :].reshape(H, F)
    dw2 = np.outer(dy, np.maximum(z, np.float32(0)))
    dz = np.zeros(F, dtype=np.float32)
    for r in range(H):
        dz = dz + w2[r, :] * dy[r]
    dz = np.where(z > 0, dz, np.float32(0))
    dx = np.zeros(H, dtype=np.float32)
    for r in range(F):
        dx = dx + w1[r, :] * dz[r]
    return np.concatenate([np.outer(dz, x).ravel(), dw2.ravel()]), dx


def mix(picks, per_row, weighted=True):
    """Each token's sum over its rows of g * row (g = 1 unweighted), in row order."""
    out = np.zeros((T, H), dtype=np.float32)
    for row, (i, g) in enumerate(picks):
        out[i] = out[i] + (g * per_row[row] if weighted else per_row[row])
    return out


def moe_loads(k):
    """(routed, loads): tokens of each expert on each device (N x E) and per expert."""
    routed = np.zeros((N, E), dtype=np.int64)
    for d in range(N):
        for e in rows(d, k)[1]:
            routed[d, e] += 1
    return routed, routed.sum(axis=0)


def moe_holders(k):
    """The placement every device computes alike: owners e // 2, overlap 2, 2 slots."""
    return phalanx.moe_place(OWNERS, moe_loads(k)[1].tolist(), overlap=2, slots=2)


def moe_device_step(comm, k):
    """Device comm.rank's forward and backward of the layer through `ExpertLayer`:
    (y, dx, grads, routes, compute) with y and dx T x H, grads the whole parameter-sized
    gradient array after spRS (meaningful in the owned experts' slots)."""
    d = comm.rank
    holders = moe_holders(k)
    layer = phalanx.ExpertLayer(comm, OWNERS, holders, W, H)
    params = np.zeros(layer.params_len, dtype=np.float32)
    for e in range(E):
        if OWNERS[e] == d:
            params[layer.expert_slice(e)] = expert_weights(e)
    layer.materialize(params)
    picks, experts = rows(d, k)
    x, cs = inputs(d)
    got = layer.dispatch(np.stack([x[i] for i, _ in picks]), experts)
    w = params.reshape(E, W)
    ys = np.stack([mlp(w[e], t)[0] for t, e in zip(got.tokens, got.experts)] or [np.zeros(H, np.float32)])
    y = mix(picks, layer.combine(got, ys[: len(got)]))

    # Backward: each row's output gradient g * c_i goes where its token went.
    dys = np.stack([g * cs[i] for i, g in picks])
    dy_got = layer.dispatch(dys, experts)
    if dy_got.experts.tolist() != got.experts.tolist():
        raise AssertionError("the gradients were dispatched unlike the tokens")
    grads = np.zeros(layer.params_len, dtype=np.float32)
    gw = grads.reshape(E, W)  # a view: the rows are the experts' slots
    dxs = []
    for t, dy, e in zip(got.tokens, dy_got.tokens, got.experts):
        dw, dx = mlp_backward(w[e], t, dy)
        gw[e] = gw[e] + dw
        dxs.append(dx)
    dx_rows = layer.combine(dy_got, np.stack(dxs) if dxs else np.zeros((0, H), np.float32))
    layer.reduce_gradients(grads)
    return y, mix(picks, dx_rows, weighted=False), grads, got.routes, got.compute


def moe_dense_reference(k, holders, routes):
    """The dense reference, one process, from the plan's routes (frm, expert, to, n):
    per device its forward outputs and input gradients (T x H each), and per expert its
    gradient: each holder's sum in arrival order, the holders' sums in ascending order."""
    all_rows = [rows(d, k) for d in range(N)]
    data = [inputs(d) for d in range(N)]
    arrivals = [[] for _ in range(N)]  # per holder: (source, row)
    for src in range(N):
        experts = all_rows[src][1]
        taken = [0] * E
        for frm, e, to, n in routes:
            if frm == src:
                mine = [r for r in range(len(experts)) if experts[r] == e]
                arrivals[to] += [(src, r) for r in mine[taken[e] : taken[e] + n]]
                taken[e] += n
    per_holder = np.zeros((E, N, W), dtype=np.float32)
    for h in range(N):
        for src, r in sorted(arrivals[h], key=lambda sr: (sr[0], all_rows[sr[0]][1][sr[1]], sr[1])):
            picks, experts = all_rows[src]
            (i, g), e = picks[r], experts[r]
            x, cs = data[src]
            per_holder[e, h] = per_holder[e, h] + mlp_backward(expert_weights(e), x[i], g * cs[i])[0]
    outputs = []
    for d in range(N):
        picks, experts = all_rows[d]
        x, cs = data[d]
        ys = [mlp(expert_weights(e), x[i])[0] for (i, _), e in zip(picks, experts)]
        dxs = [mlp_backward(expert_weights(e), x[i], g * cs[i])[1] for (i, g), e in zip(picks, experts)]
        outputs.append((mix(picks, ys), mix(picks, dxs, weighted=False)))
    grads = []
    for e in range(E):
        want = per_holder[e, holders[e][0]]
        for h in holders[e][1:]:
            want = want + per_holder[e, h]
        grads.append(want)
    return outputs, grads
