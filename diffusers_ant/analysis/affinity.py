"""Task affinity between denoising tasks: cosine similarity of per-timestep gradients (ANT, Sec. 3).

ANT (Go et al., NeurIPS 2023) treats the denoising loss at each timestep t as a task and defines
the task affinity score of timesteps i and j as the cosine similarity of their loss gradients,

    TAS(i, j) = < g_i, g_j > / (||g_i|| ||g_j||),   g_t = d/dtheta E_{x0, eps} || f_theta(x_t, t) - target ||^2,

averaged over training checkpoints. Observation O1: TAS falls as |t_i - t_j| (or the log-SNR
distance) grows. The same matrix drives ANT's gradient clustering objective (`--clustering
gradient --affinity_file`); `task_affinity` writes exactly the JSON that reads.

Bounded memory. The reference code stored T full gradients (T x |theta| floats: hundreds of GB for
a DiT, PAPERS.md). Here:
- the gradient is measured on a grid of G timesteps spread over 0..T-1 (the clustering interpolates
  the G x G matrix to T x T);
- the grid points are processed one at a time: the gradient of grid point g is accumulated over the
  batches in the parameters' `.grad` (one |theta| buffer), then reduced to a vector of size D and
  stored; only G x D floats are ever kept;
- D is either the size of a parameter subset (`param_subset`: module-name prefixes; the other
  parameters are frozen, which also makes the backward cheaper) or `projection_dim`, a random
  projection of all (or the subset's) gradient coordinates.

The projection is a count sketch (Charikar et al. 2002; the sparse Johnson-Lindenstrauss transform of
Kane & Nelson 2014 with one non-zero per column): coordinate k of the flat gradient is added, with a
random sign s(k) = +-1, to bucket h(k) in 0..D-1. It is a linear map S with E[<S a, S b>] = <a, b>
and Var <= 2 ||a||^2 ||b||^2 / D, so projected cosines approximate the exact ones to about
1 / sqrt(D) (0.016 at D = 4096; `tests/test_analysis.py` checks it). A dense Gaussian projection
has the same guarantee but costs D x |theta| multiply-adds and random numbers per gradient (4.5e9 for
the 1.1M demo UNet at D = 4096), the count sketch |theta|. The hash and the signs are drawn from a
generator seeded by (seed, parameter index, chunk index), chunk by chunk, so the same projection is
applied to every grid point and checkpoint without ever being stored.

Within one batch, every grid timestep sees the same clean images x0 and the same noise eps, so the
gradients differ only through t. A per-timestep loss weight (min-SNR, P2) scales g_t by a constant
and leaves every cosine unchanged, so the plain MSE is used.

Two estimators (`estimator=`). The default, `"mean_gradient"`, takes the cosine of each grid
point's gradient averaged over the batches (one cosine matrix per checkpoint, then the mean over
checkpoints): the cosine of expected gradients, less noisy per batch. The paper averages per-
iteration cosines over training ("pairwise gradient similarity averaged across training
iterations", ANT appendix D.3): `"mean_cosine"` computes one cosine matrix per batch and
checkpoint and averages those. The two differ: minibatch noise shrinks per-batch cosines towards 0,
so `mean_cosine` values are smaller in magnitude; their ordering along |t_i - t_j| (O1) is what both
measure.

O1's p-value. The G(G-1)/2 entries of the matrix share rows (every entry of row i involves
timestep i), so they are not independent pairs: the p-value of Spearman's test over them
(`o1_spearman`) is too small (under a null with per-row effects it rejected 12% of the time at the
5% level; tests/test_analysis.py). `o1_mantel` is the Mantel permutation test (Mantel 1967): the
grid labels of the matrix are permuted together, rows and columns alike, which keeps the
dependence between entries and is exact under that null. The Spearman statistic stays the effect size.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CountSketch",
    "affinity_from_folders",
    "gradient_cosines",
    "o1_mantel",
    "o1_spearman",
    "task_affinity",
    "timestep_grid",
]

AFFINITY_ESTIMATORS = ("mean_gradient", "mean_cosine")
MANTEL_PERMUTATIONS = 20_000
# "auto" projection: keep exact gradients while G x D floats fit in this many bytes.
AUTO_EXACT_BYTES = 512 * 2**20
DEFAULT_PROJECTION_DIM = 4096
_CHUNK = 1 << 20  # coordinates hashed per generator call: bounds the sketch's scratch memory


def timestep_grid(num_timesteps: int, points: int) -> list:
    """`points` distinct training indices spread evenly over 0..T-1, both ends included."""
    if points < 2:
        raise ValueError(f"the timestep grid needs at least 2 points, got {points}")
    if points > num_timesteps:
        raise ValueError(f"the timestep grid has {points} points but the scheduler only {num_timesteps} timesteps")
    return sorted({int(round(x)) for x in np.linspace(0, num_timesteps - 1, points)})


class CountSketch:
    """A seeded count-sketch projection of flat gradients (given as a list of tensors) to `dim` values.

    `project(tensors)` maps the concatenation of the flattened tensors to R^dim without building it:
    each tensor is hashed chunk by chunk from a generator seeded by (seed, tensor index, chunk
    index), so the same tensors shapes always get the same projection. See the module docstring.
    """

    def __init__(self, dim: int, seed: int = 0):
        if dim < 1:
            raise ValueError(f"projection_dim must be positive, got {dim}")
        self.dim = int(dim)
        self.seed = int(seed)

    def _hash(self, tensor_index, chunk_index, n, device):
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, tensor_index, chunk_index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        )
        buckets = torch.randint(0, self.dim, (n,), generator=generator)
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).float().mul_(2).sub_(1)
        return buckets.to(device), signs.to(device)

    @torch.no_grad()
    def project(self, tensors) -> torch.Tensor:
        out = None
        for i, tensor in enumerate(tensors):
            flat = tensor.detach().reshape(-1).double()
            if out is None:
                out = torch.zeros(self.dim, dtype=torch.float64, device=flat.device)
            for c, start in enumerate(range(0, flat.numel(), _CHUNK)):
                part = flat[start : start + _CHUNK]
                buckets, signs = self._hash(i, c, part.numel(), part.device)
                out.index_add_(0, buckets, part * signs.double())
        return out if out is not None else torch.zeros(self.dim, dtype=torch.float64)


def gradient_cosines(vectors: torch.Tensor) -> np.ndarray:
    """Cosine-similarity matrix of the rows of `vectors` (G, D): symmetric, unit diagonal.

    A zero gradient (e.g. a subset the loss does not reach) has cosine 0 with every other row.
    """
    v = vectors.double()
    norms = v.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, v / norms.clamp_min(1e-300), torch.zeros_like(v))
    cos = (unit @ unit.T).clamp(-1, 1)
    cos = (cos + cos.T) / 2  # exact symmetry despite rounding
    cos.fill_diagonal_(1.0)
    return cos.cpu().numpy()


def o1_spearman(timesteps, affinity):
    """ANT's observation O1 as one number: Spearman's rank correlation between |t_i - t_j| and
    TAS(i, j) over the pairs i < j (negative: affinity falls with timestep distance). Returns
    `(rho, p_value)`, `(None, None)` with fewer than 3 grid points. The p-value treats the pairs as
    independent, which they are not (they share rows): use `o1_mantel`'s p-value instead."""
    from scipy.stats import spearmanr

    t = np.asarray(timesteps, dtype=np.float64)
    A = np.asarray(affinity, dtype=np.float64)
    i, j = np.triu_indices(len(t), k=1)
    if len(i) < 3:
        return None, None
    result = spearmanr(np.abs(t[i] - t[j]), A[i, j])
    rho, p = float(result.statistic), float(result.pvalue)
    return (None, None) if math.isnan(rho) else (rho, p)


def o1_mantel(timesteps, affinity, permutations: int = MANTEL_PERMUTATIONS, seed: int = 0, batch: int = 1000):
    """Mantel permutation test of O1 (Mantel, Cancer Research 1967): is the Spearman correlation
    between |t_i - t_j| and TAS(i, j) further from 0 than under random relabelling of the grid?

    Each permutation pi relabels the grid points, rows and columns together (TAS'(i, j) =
    TAS(pi(i), pi(j))), so the entries keep their dependence through shared rows; the two-sided
    p-value is (1 + #{|rho_pi| >= |rho|}) / (1 + permutations), at least 1 / (1 + permutations).
    Spearman's rho is Pearson's correlation of average ranks, and a relabelled matrix has the same
    entries, hence the same ranks rearranged: each permutation costs one gather of the rank matrix.

    Returns `(rho, p_value)`; `(None, None)` with fewer than 4 grid points or a constant matrix.
    """
    from scipy.stats import rankdata

    t = np.asarray(timesteps, dtype=np.float64)
    A = np.asarray(affinity, dtype=np.float64)
    G = len(t)
    if A.shape != (G, G):
        raise ValueError(f"the affinity matrix must be {G}x{G} for {G} grid timesteps, got {A.shape}")
    if permutations < 1:
        raise ValueError(f"permutations must be positive, got {permutations}")
    i, j = np.triu_indices(G, k=1)
    if G < 4:
        return None, None
    d = rankdata(np.abs(t[i] - t[j]))
    r = rankdata(A[i, j])
    d, r = d - d.mean(), r - r.mean()
    norm = math.sqrt(float((d**2).sum() * (r**2).sum()))
    if norm == 0:
        return None, None
    ranks = np.zeros((G, G))
    ranks[i, j] = r
    ranks[j, i] = r
    rho = float((d * r).sum() / norm)
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, permutations, batch):
        n = min(batch, permutations - start)
        perms = np.argsort(rng.random((n, G)), axis=1)
        stats = (ranks[perms[:, i], perms[:, j]] * d).sum(axis=1) / norm
        exceed += int((np.abs(stats) >= abs(rho) - 1e-12).sum())
    return rho, (1 + exceed) / (1 + permutations)


def _select_parameters(model, param_subset):
    """The parameters whose gradients are measured: all, or those under the given module prefixes.
    Every other parameter is frozen for the measurement (no gradient, cheaper backward)."""
    named = list(model.named_parameters())
    if param_subset:
        prefixes = tuple(param_subset) if not isinstance(param_subset, str) else tuple(
            p.strip() for p in param_subset.split(",") if p.strip()
        )
        chosen = [(n, p) for n, p in named if n.startswith(prefixes)]
        if not chosen:
            example = ", ".join(sorted({n.split(".")[0] for n, _ in named})[:6])
            raise ValueError(f"--param_subset {','.join(prefixes)!r} matches no parameter (top-level modules: {example})")
    else:
        chosen = named
    keep = {id(p) for _, p in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in keep)
    return [p for _, p in chosen]


def analysis_adapter(folder: str, model_type: str):
    """The model adapter of a saved run for the affinity measurement, at the run's own --resolution and
    --flow_shift (its training_config.json): FLUX.1 and Qwen-Image transformers have no sample size, and
    FLUX.1's shifted sigma table depends on both, so training index t is the noise level the run trained at
    t only with them (without, the adapters' 512 px defaults)."""
    from ..models import get_model_adapter
    from .common import training_config

    config = training_config(folder)
    options = {key: config[key] for key in ("resolution", "flow_shift") if config.get(key) is not None}
    return get_model_adapter(model_type).load(pretrained_model_name_or_path=folder, **options)


def _to_device(value, device):
    """Tensors inside tuples / lists / dicts moved to ``device`` (everything else as it is)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _draw_batches(adapter, dataset_name, num_batches, batch_size, seed, train_data_dir=None):
    """`num_batches` fixed (x0, conditioning, noise) triples from a seeded shuffle of the dataset."""
    from ..data import load_training_dataset, make_train_dataloader, resolve_columns
    from ..training.args import TEXT_TO_IMAGE_TYPES

    model_type = adapter.model_type
    classes = getattr(adapter, "num_classes", None)
    conditional = model_type in ("unet", "dit") and classes is not None and not (model_type == "dit" and classes == 1)
    dataset = load_training_dataset(dataset_name=dataset_name, train_data_dir=train_data_dir)
    columns = resolve_columns(dataset, need_captions=model_type in TEXT_TO_IMAGE_TYPES,
                              need_conditioning=model_type == "controlnet", need_classes=conditional)
    resolution = adapter.sample_size * (adapter.vae_scale_factor(adapter.vae) if adapter.latent else 1)
    loader = make_train_dataloader(dataset, columns, resolution=resolution, batch_size=batch_size,
                                   num_channels=adapter.num_channels, seed=seed, **adapter.data_options())
    if len(loader) < num_batches:
        raise ValueError(f"the dataset gives {len(loader)} batches of {batch_size}, fewer than --batches {num_batches}")
    generator = torch.Generator().manual_seed(int(seed) + 1)
    # on the model's device (--device): pixel models' x0 and class labels stay where the loader made them
    device = next(adapter.model.parameters()).device
    drawn = []
    for batch, _ in zip(loader, range(num_batches)):
        # the VAE's posterior sample from the same seeded generator (it drew from the global RNG, so a latent
        # model's affinity changed from run to run under one --seed)
        x0, conditioning = adapter.encode_batch(batch, generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        drawn.append(_to_device((x0, conditioning, noise), device))
    return drawn


def _grid_gradient(adapter, model, batches, t, prediction_type):
    """Accumulate into `.grad` the gradient of the mean denoising loss at training index `t`."""
    from ..schedule import add_noise, model_timesteps, training_target

    scheduler = adapter.noise_scheduler
    for x0, conditioning, noise in batches:
        steps = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        x_t = add_noise(scheduler, x0, noise, steps)
        target = training_target(scheduler, x0, noise, steps, prediction_type)
        pred = adapter.predict(model, x_t, model_timesteps(scheduler, steps), conditioning)
        loss = F.mse_loss(pred.float(), target.float()) / len(batches)
        loss.backward()


def task_affinity(adapter, states, batches, timesteps, param_subset=None, projection_dim=None, seed=0,
                  progress=True, estimator="mean_gradient") -> dict:
    """The task-affinity matrix of `adapter.model` on the grid `timesteps`, averaged over `states`.

    Args:
        adapter: a `diffusers_ant.models` adapter (its `model`, `noise_scheduler`, `predict`).
        states: state dicts of `adapter.model` (checkpoints); None entries mean "the current weights".
        batches: (x0, conditioning, noise) triples (see `_draw_batches`), shared by every grid point.
        timesteps: increasing training indices of the grid.
        param_subset: module-name prefixes (a list or a comma-separated string) to restrict to.
        projection_dim: None for exact gradients, else the count-sketch dimension D.
        estimator: "mean_gradient" (cosines of the gradients averaged over `batches`) or
            "mean_cosine" (the paper's: the mean over batches of per-batch cosines); module docstring.

    Returns a dict: `affinity` (G x G numpy array, the mean over states of each state's cosine
    matrix), `per_state` (the individual matrices), `num_parameters` (gradient coordinates measured)
    and `dim` (stored per grid point).
    """
    from tqdm.auto import tqdm

    from ..schedule import resolve_prediction_type

    if estimator not in AFFINITY_ESTIMATORS:
        raise ValueError(f"unknown affinity estimator {estimator!r}; valid: {', '.join(AFFINITY_ESTIMATORS)}")
    # one group of all batches (their mean gradient), or one group per batch (per-batch cosines)
    groups = [list(batches)] if estimator == "mean_gradient" else [[b] for b in batches]
    model = adapter.model
    prediction_type = resolve_prediction_type(adapter.noise_scheduler)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    params = _select_parameters(model, param_subset)
    num_parameters = sum(p.numel() for p in params)
    sketch = CountSketch(projection_dim, seed) if projection_dim else None
    matrices = []
    bar = tqdm(total=len(states) * len(groups) * len(timesteps), desc="affinity", unit="t", disable=not progress)
    try:
        model.eval()  # no dropout: the gradients are a deterministic function of (weights, batch, t)
        for state in states:
            if state is not None:
                try:
                    model.load_state_dict(state)
                except RuntimeError as err:  # another architecture, or a LoRA run's adapter weights
                    raise ValueError(f"a checkpoint does not fit the model of --model: {str(err).splitlines()[0]}") from None
            per_group = []
            for group in groups:
                rows = []
                for t in timesteps:
                    for p in params:
                        p.grad = None
                    _grid_gradient(adapter, model, group, t, prediction_type)
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    if sketch is not None:
                        rows.append(sketch.project(grads))
                    else:
                        rows.append(torch.cat([g.detach().reshape(-1).double() for g in grads]))
                    bar.update(1)
                per_group.append(gradient_cosines(torch.stack(rows)))
                del rows
            matrices.append(np.mean(per_group, axis=0))
    finally:
        bar.close()
        for p in params:
            p.grad = None
        model.load_state_dict(original)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        model.train(was_training)
    mean = np.mean(matrices, axis=0)
    mean = (mean + mean.T) / 2
    np.fill_diagonal(mean, 1.0)
    return {"affinity": mean, "per_state": matrices, "num_parameters": num_parameters,
            "dim": projection_dim or num_parameters, "estimator": estimator}


def _json_float(x):
    return float(x) if x is not None and np.isfinite(x) else None


def affinity_from_folders(
    model,
    checkpoints=None,
    dataset_name=None,
    grid: int = 20,
    batches: int = 4,
    batch_size: int = 32,
    param_subset=None,
    projection_dim="auto",
    seed: int = 0,
    model_type=None,
    train_data_dir=None,
    progress: bool = True,
    estimator: str = "mean_gradient",
    permutations: int = MANTEL_PERMUTATIONS,
    device=None,
) -> dict:
    """Task affinity of a trained model, as the JSON-ready dict `analyze.py affinity` writes (on `device`:
    default the CPU).

    Args:
        model: a saved model folder, or a list of them. The first gives the architecture, scheduler
            and model type; each folder's weights is one state to average over unless `checkpoints`
            is given.
        checkpoints: checkpoint-N folders (Accelerate's `model.safetensors`) or model folders whose
            weights are averaged over instead (e.g. `run/checkpoint-*`; globs are expanded).
        grid, batches, batch_size: G grid points; each grid point's gradient is the mean over
            `batches` fixed batches of `batch_size`.
        param_subset, projection_dim: see the module docstring; `projection_dim="auto"` keeps exact
            gradients while G x |theta| floats fit in 512 MiB, else projects to 4096.
        estimator: "mean_gradient" or the paper's "mean_cosine" (module docstring).
        permutations: of the Mantel test of O1 (`o1_mantel`).

    Returns `{"timesteps", "affinity", "log_snr", "o1_spearman", "o1_mantel_pvalue", ...}`
    (`o1_spearman_pvalue` is the pairwise test's, kept for comparison: it assumes independent pairs):
    `timesteps` / `affinity` are the form `cluster_timesteps(..., objective="gradient", affinity=path)`
    and `--clustering gradient --affinity_file` read.
    """
    from ..schedule import num_train_timesteps, schedule_log_snr
    from .common import check_model_folder, expand_checkpoints, infer_model_type, load_state_dict

    folders = [model] if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else list(model)
    if not folders:
        raise ValueError("no model folder given")
    for folder in folders:
        check_model_folder(folder)
    start = time.perf_counter()
    model_type = model_type or infer_model_type(folders[0])
    adapter = analysis_adapter(folders[0], model_type)
    if device is not None:
        adapter.to(device)
    sources = expand_checkpoints(checkpoints) if checkpoints else list(folders)
    states = [load_state_dict(path) for path in sources]
    T = num_train_timesteps(adapter.noise_scheduler)
    timesteps = timestep_grid(T, grid)
    if projection_dim == "auto":
        params = _select_parameters(adapter.model, param_subset)
        exact_bytes = len(timesteps) * sum(p.numel() for p in params) * 8
        projection_dim = None if exact_bytes <= AUTO_EXACT_BYTES else DEFAULT_PROJECTION_DIM
    drawn = _draw_batches(adapter, dataset_name, batches, batch_size, seed, train_data_dir=train_data_dir)
    result = task_affinity(adapter, states, drawn, timesteps, param_subset=param_subset,
                           projection_dim=projection_dim, seed=seed, progress=progress, estimator=estimator)
    affinity = result["affinity"]
    rho, p = o1_spearman(timesteps, affinity)
    _, mantel_p = o1_mantel(timesteps, affinity, permutations=permutations, seed=seed)
    try:
        log_snr = [_json_float(v) for v in schedule_log_snr(adapter.noise_scheduler)[timesteps].tolist()]
    except ValueError:  # a scheduler without an SNR curve
        log_snr = None
    subset = param_subset if isinstance(param_subset, (str, type(None))) else ",".join(param_subset)
    return {
        "timesteps": timesteps,
        "affinity": [[float(x) for x in row] for row in affinity],
        "log_snr": log_snr,
        "o1_spearman": rho,
        "o1_mantel_pvalue": mantel_p,
        "o1_mantel_permutations": permutations,
        "o1_spearman_pvalue": p,
        "o1_spearman_per_checkpoint": [o1_spearman(timesteps, m)[0] for m in result["per_state"]],
        "num_timesteps": T,
        "model": [str(f) for f in folders],
        "checkpoints": [str(s) for s in sources],
        "model_type": model_type,
        "dataset_name": dataset_name or train_data_dir,
        "estimator": estimator,
        "batches": batches,
        "batch_size": batch_size,
        "param_subset": subset,
        "num_parameters": result["num_parameters"],
        "projection_dim": projection_dim,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
    }
