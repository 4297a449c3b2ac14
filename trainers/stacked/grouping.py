"""Which jobs of a multirun can train as one stacked model, and why the others cannot.

Jobs form a group when their configs are equal except for the per-member keys (:data:`MEMBER_KEYS`).
Why a whitelist: a stacked member must end exactly where its plain run ends. Only what the stacked
engine (:mod:`shiftlab.trainers.stacked.engine`) reproduces member by member is accepted; everything
else runs under the basic launcher with a one-line reason.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from shiftlab.trainers.stacked.probes import why_not_hosted

# BatchNorm, Ghost BatchNorm, Batch Renorm and noisy BN: per-member batch and running statistics (stacked
# buffers under vmap; see engine.py), noisy BN's noise drawn per member as its plain run draws it (dropout.py).
# Not stacked: the Triton BN and weight-standardized convolutions (:data:`NOT_STACKED` gives the reasons).
BATCHNORM = "shiftlab.trainers.norms.batchnorm.build"
GHOST_BN = "shiftlab.trainers.norms.ghost_bn.build"
BATCH_RENORM = "shiftlab.trainers.norms.batch_renorm.build"
NOISY_BN = "shiftlab.trainers.norms.noisy_bn.build"
BN_KINDS = {BATCHNORM, GHOST_BN, BATCH_RENORM, NOISY_BN}
NORMS = {"shiftlab.trainers.norms.none.build", "shiftlab.trainers.norms.layernorm.build",
         "shiftlab.trainers.norms.groupnorm.build"} | BN_KINDS
NOT_STACKED = {
    "shiftlab.trainers.norms.triton_bn.build": "its Triton kernel ops are not checked under vmap",
    "shiftlab.trainers.norms.weight_std.build": "its standardized convolutions are not checked member by member",
}
OPTIMIZERS = {"torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW"}
SCHEDULERS = {"shiftlab.trainers.optim.constant_schedule", "shiftlab.trainers.optim.cosine_schedule",
              "shiftlab.trainers.optim.step_schedule"}
MODULES = {"shiftlab.trainers.modules.classification.ClassificationModule"}
# the always-on callbacks (configs/callbacks/base/default.yaml) the stacked engine stands in for
BASE_CALLBACKS = {"model_checkpoint", "last_checkpoint", "model_summary", "rich_progress_bar", "diagnosis"}
# trainer keys that may take any value (they change nothing a member computes)
FREE_TRAINER_KEYS = {"_target_", "default_root_dir", "max_epochs", "min_epochs", "accelerator", "enable_progress_bar",
                     "enable_model_summary", "log_every_n_steps", "deterministic", "enable_checkpointing"}
FIXED_TRAINER_KEYS = {"devices": 1, "num_nodes": 1, "precision": "32-true", "check_val_every_n_epoch": 1,
                      "sync_batchnorm": False}
# the per-member keys: a group's configs may differ only here (the seed, and values that act per member
# elementwise: each member's param group has its own lr / weight_decay, its data module its own label noise)
SEED_KEYS = ("seed", "data.seed")
MEMBER_KEYS = SEED_KEYS + ("optimizer.lr", "optimizer.weight_decay", "data.label_noise")
EARLY_STOPPING = "shiftlab.callbacks.early_stopping.RuleEarlyStopping"
# what a stacked member logs before its early-stopping rule decides (the rule's monitor must be one of them)
MEMBER_METRICS = {"val/loss", "val/acc", "val/loss_se", "train/loss", "train/acc"}


def _target(node: Any) -> str | None:
    return node.get("_target_") if isinstance(node, DictConfig) else None


def why_not_stacked(cfg: DictConfig) -> str | None:
    """None when ``cfg`` (a job's config without its ``hydra`` node) can be a stacked member, else a
    one-line reason naming the key that prevents it."""
    if _target(cfg.get("module")) not in MODULES:
        return f"module={_target(cfg.get('module'))}: only classification is stacked so far"
    if (cfg.get("module") or {}).get("manual_optimization"):
        return "module.manual_optimization=true: the stacked checkpoints write the automatic loop's counters"
    batching = _target(cfg.get("batching"))
    if batching not in ("shiftlab.trainers.batching.MiniBatch", "shiftlab.trainers.batching.FullBatch"):
        return f"batching={batching}: only mini-batch and full-batch steps are stacked"
    norm = _target(cfg.get("norm"))
    if norm not in NORMS:
        why = NOT_STACKED.get(norm, "a norm the stacked engine does not know")
        return (f"norm={norm}: only none / layernorm / groupnorm / batchnorm / ghost_bn / batch_renorm / noisy_bn "
                f"are stacked, not the BatchNorm variants triton_bn / weight_std ({why})")
    if norm == BATCHNORM and cfg.norm.get("sync", False):
        return "norm.sync=true: the all-reducing BatchNorm is for DDP; stacked members use nn.BatchNorm"
    if norm in BN_KINDS and cfg.norm.get("momentum", 0.1) is None:
        return ("norm.momentum=null: BN's cumulative average reads num_batches_tracked as a Python number, "
                "which vmap does not allow")
    if _target(cfg.get("optimizer")) not in OPTIMIZERS:
        return f"optimizer={_target(cfg.get('optimizer'))}: only elementwise SGD / momentum / Adam / AdamW stack"
    if cfg.get("scheduler") is not None and _target(cfg.scheduler) not in SCHEDULERS:
        return f"scheduler={_target(cfg.scheduler)}: not an epoch-wise schedule the stacked engine knows"
    if int((cfg.get("divergence") or {}).get("check_every", 1)) != 1:
        return "divergence.check_every>1: the stacked guard checks every step"
    callbacks = cfg.get("callbacks") or {}
    extra = sorted(set(callbacks.keys()) - BASE_CALLBACKS)
    stops = [k for k in extra if _target(callbacks[k]) == EARLY_STOPPING]
    probes = [k for k in extra if k not in stops]
    if probes and float((cfg.model or {}).get("dropout") or 0.0) > 0:  # masks: stacked/dropout.py
        return (f"callbacks.{probes[0]} with model.dropout>0: a probe may draw from the plain run's global RNG "
                "(train-mode forwards), which shifts the run's later dropout masks")
    if probes and norm == NOISY_BN:  # noise: stacked/dropout.py
        return (f"callbacks.{probes[0]} with norm=noisy_bn: a probe may draw from the plain run's global RNG "
                "(train-mode forwards), which shifts the run's later noise")
    for name in probes:  # epoch probes run per member (probes.py)
        reason = why_not_hosted(name, callbacks[name])
        if reason:
            return reason
    reason = _why_not_early_stopping(cfg, stops)
    if reason:
        return reason
    noisy = float((cfg.data or {}).get("label_noise") or 0.0) > 0  # label noise adds a memorization probe
    if (cfg.get("probes") or {}).get("max_overhead") is not None and (probes or noisy):
        return (f"probes.max_overhead={cfg.probes.max_overhead}: the run-wide probe budget is not stacked "
                "(probe skipping depends on the run's own timing)")
    mc = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if mc is not None and (mc.get("monitor") != "val/acc" or mc.get("mode") != "max"):
        return f"callbacks.model_checkpoint.monitor={mc.get('monitor')}: only val/acc (max) is tracked per member"
    for key, value in (cfg.trainer or OmegaConf.create()).items_ex(resolve=False):
        if key in FREE_TRAINER_KEYS:
            continue
        if key not in FIXED_TRAINER_KEYS or value != FIXED_TRAINER_KEYS[key]:
            return f"trainer.{key}={value}: not reproduced by the stacked engine"
    loggers = set((cfg.get("logger") or {}).keys())
    if loggers - {"csv"}:
        return f"logger.{sorted(loggers - {'csv'})[0]}: only the csv logger is written for stacked members"
    for key in ("ckpt_path", "debug", "hparams_search"):
        if cfg.get(key):
            return f"{key}={cfg.get(key) if not isinstance(cfg.get(key), DictConfig) else '...'}: runs alone"
    if cfg.get("imports"):
        return "imports: user modules may change what is built; runs alone"
    return None


def _why_not_early_stopping(cfg: DictConfig, names: list[str]) -> str | None:
    """The stacked engine runs one RuleEarlyStopping per member on the metrics it logs itself."""
    if len(names) > 1:
        return f"callbacks.{names[1]}: more than one early-stopping callback runs alone"
    for name in names:
        node = cfg.callbacks[name]
        for key, default in (("monitor", "val/loss"), ("train_monitor", "train/loss")):
            value = node.get(key, default)
            if value is not None and value not in MEMBER_METRICS:
                return f"callbacks.{name}.{key}={value}: a stacked member logs only {', '.join(sorted(MEMBER_METRICS))}"
        if int((cfg.trainer or {}).get("min_epochs") or 0) > 1:
            return f"trainer.min_epochs={cfg.trainer.min_epochs} with early stopping: runs alone"
    return None


def group_key(cfg: DictConfig) -> str:
    """The config with the per-member keys (and ``module.steps_per_call``) removed, unresolved: jobs with
    equal keys form a group. A per-member key other than the seed that another value interpolates stays in
    the key (that value would differ between members too)."""
    node = OmegaConf.to_container(cfg, resolve=False)
    node.pop("hydra", None)
    # module.steps_per_call changes nothing a member computes (the engine runs its own loop, and the
    # member's checkpoints count batches, which a plain run resumes under any steps_per_call)
    if isinstance(node.get("module"), dict):
        node["module"].pop("steps_per_call", None)
    text = OmegaConf.to_yaml(OmegaConf.create(node))
    for key in MEMBER_KEYS:
        parent, _, leaf = key.rpartition(".")
        holder = node.get(parent) if parent else node
        if isinstance(holder, dict) and leaf in holder and (key in SEED_KEYS or "${" + key + "}" not in text):
            holder.pop(leaf)
    return OmegaConf.to_yaml(OmegaConf.create(node), sort_keys=True)


def plan(configs: list[DictConfig]) -> tuple[list[list[int]], dict[int, str]]:
    """Split job indices into stacked groups (two or more members) and lone jobs with their reason."""
    groups: dict[str, list[int]] = {}
    alone: dict[int, str] = {}
    for i, cfg in enumerate(configs):
        reason = why_not_stacked(cfg)
        if reason is None:
            groups.setdefault(group_key(cfg), []).append(i)
        else:
            alone[i] = reason
    stacked = []
    for members in groups.values():
        if len(members) == 1:
            alone[members[0]] = f"no other job differs from it only in {', '.join(MEMBER_KEYS)}"
        else:
            stacked.append(members)
    return stacked, alone
