"""The one home of a user's stored p_theta(z|x): layout, versions, the current pointer, load/store, and the latent
type of CLaPs and policies (every "is it discrete?" decision of the project is made by the functions here).

Storage: one policy table per CLaP version (tasks/policy/table.py: a Lance dataset, one row per user, a tag per
night); `current_fit` / `load_user_policy` read it at the latest version or at a pinned tag. A fit's version =
<clap_version>[-s<settings>]-<data_hash> for head-only and <clap_version>-<mode>[-s<settings>]-<data_hash> for the
other modes (discrete CLaPs: mode `codes-<estimator>`): a function of everything the fitted policy is a function
of, so an unchanged user is recognised by it. The row's `artifact` keeps the legacy file name: `head.safetensors`
(head-only and every Gaussian cold start: the zero head = the prior), `policy.safetensors` (trunk-frozen /
faithful: the mode's trained tensors, named as in `LatentEncoder`, kept in a weights file the row references) or
`codes.safetensors` (discrete CLaPs: {"delta": (K,)}; cold start delta = 0 = the CLaP prior). Stores from before
the table (users/<key[:2]>/<key>/<version>/ folders) are copied into it by `migrate_legacy`.

Serving latents (spec §9.12: generation uses the mean): `latents(policies, encoder, ids, mask)` for any mix of users
and both latent types; the forward of each form is tasks/models/policy.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import torch
from safetensors.torch import load as st_load

from latentpref.tasks.data.store import Store, json_digest
from latentpref.tasks.data.validate import check_user_id, user_storage_key
from latentpref.tasks.models.policy import policy_latent, predict_latent, user_code_probs, user_latent
from latentpref.tasks.models.latent import bounded_logvar, within_prior

__all__ = ["CODES_FILE", "CODES_MODE", "ENCODER_MODES", "HEAD_FILE", "MODES", "POLICY_FILE", "UserPolicy",
           "current_fit", "fit_version", "is_discrete", "latents", "load_user_head", "load_user_policy",
           "migrate_legacy", "needs_migration", "policy_table", "previous_fit", "prior_latent", "seed_policy",
           "store_user", "store_users", "user_data_hash", "user_folder"]

MODES = ("head-only", "trunk-frozen", "faithful")
ENCODER_MODES = ("trunk-frozen", "faithful")
HEAD_FILE = "head.safetensors"
POLICY_FILE = "policy.safetensors"
CODES_FILE = "codes.safetensors"      # discrete CLaPs: {"delta": (K,)}
CODES_MODE = "codes"                  # the stored `mode` of a discrete user policy (fit or cold start)


# ---------------------------------------------------------------------------------------------------------------
# Latent type: the one place that tells Gaussian from discrete
# ---------------------------------------------------------------------------------------------------------------


def is_discrete(model) -> bool:
    """Whether a CLaP (or its latent encoder) has discrete LPC codes (lpc.md §6.3) rather than a Gaussian latent."""
    return bool(getattr(model, "discrete", False))


def latent_type(model) -> str:
    """"discrete" or "gaussian" (`PretrainConfig.latent_type`) of a CLaP or its encoder."""
    return "discrete" if is_discrete(model) else "gaussian"


@torch.no_grad()
def prior_latent(clap, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population-prior z (B, latent_dim): 0 for a Gaussian CLaP (mean of N(0, I)), the expected prior code for a
    discrete one."""
    if is_discrete(clap):
        return clap.prior_latent(ids, mask)
    return torch.zeros(ids.shape[0], clap.cfg.latent_dim)


@dataclass(frozen=True)
class UserPolicy:
    """One user's stored p_theta(z|x), whatever the mode that fitted it."""

    mode: str
    tensors: dict[str, torch.Tensor]   # head-only / cold start: weight, bias; encoder modes: encoder tensors;
    #                                    codes: delta
    manifest: dict[str, Any]

    @property
    def cold_start(self) -> bool:
        return bool(self.manifest.get("cold_start"))

    @property
    def discrete(self) -> bool:
        """A discrete-code policy (a Gaussian CLaP's policies never are)."""
        return self.mode == CODES_MODE

    @torch.no_grad()
    def latent(self, encoder, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) (B, latent_dim) float32 of this user's policy on left-padded prompts; the serving z is mu
        (spec §9.12). `encoder` is the CLaP's (`clap.encoder`) of the same version.

        Discrete (mode `codes`): mu = z = p_u(.|x) @ codebook, the expected code vector (lpc.md §6.3), and logvar
        zeros (a placeholder: the latent is not Gaussian; use `code_probs` for the distribution)."""
        if self.discrete:
            z = encoder.code_latent(self.code_probs(encoder, input_ids, attention_mask))
            return z, torch.zeros_like(z)
        if self.cold_start:
            zeros = torch.zeros(input_ids.shape[0], encoder.cfg.latent_dim)
            return zeros, zeros.clone()          # the population prior N(0, I)
        if self.mode == "head-only":
            features = encoder.features(input_ids, attention_mask)
            mu, logvar = user_latent(self.tensors["weight"], self.tensors["bias"], features)
        else:
            mu, logvar = policy_latent(encoder, self.tensors, input_ids, attention_mask)
        return mu, bounded_logvar(logvar)    # the variance the fit itself used

    @torch.no_grad()
    def serving_latent(self, encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The z this user is served with (B, latent_dim) float32: the policy mean, for Gaussian fits scaled back
        onto the prior's ball (`latent.within_prior`: the adapter never saw latents beyond it); discrete: the
        expected code. `latent` keeps the fitted distribution itself, for the latent-space diagnostics."""
        mu, _ = self.latent(encoder, input_ids, attention_mask)
        return mu if self.discrete else within_prior(mu)

    @torch.no_grad()
    def code_probs(self, encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """p_u(k|x) (B, K) float32 of a discrete (mode `codes`) policy; cold start (delta = 0) = the CLaP prior.

        Raises:
            ValueError: a Gaussian policy.
        """
        if not self.discrete:
            raise ValueError(f"code_probs needs a discrete-code policy (mode {CODES_MODE!r}); this one is "
                             f"{self.mode!r}")
        prior = encoder.code_logits(encoder.features(input_ids, attention_mask))
        return user_code_probs(self.tensors["delta"], prior)


@torch.no_grad()
def latents(policies: Sequence[UserPolicy | None], encoder, ids: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Serving z (B, latent_dim) float32 of row b's prompt under policies[b] (None = the population prior), batched:
    a discrete CLaP in one encoder pass (each row's delta), a Gaussian one with every head-only row in one pass
    and each encoder-mode user in one pass of their own weights.

    Raises:
        ValueError: a policy of the other latent type than `encoder` (a fit of another CLaP version).
    """
    if len(policies) != ids.shape[0]:
        raise ValueError(f"{len(policies)} policies for {ids.shape[0]} prompts")
    if is_discrete(encoder):
        for p in policies:
            if p is not None and not p.discrete:
                raise ValueError(f"the served CLaP is discrete but a user policy has mode {p.mode!r} (a Gaussian "
                                 "fit of another CLaP version)")
        K = encoder.cfg.n_codes
        delta = torch.stack([torch.zeros(K) if p is None else p.tensors["delta"].float() for p in policies])
        prior = encoder.code_logits(encoder.features(ids, mask))                                    # (B, K)
        return encoder.code_latent(user_code_probs(delta.to(prior.device), prior)).float().cpu()
    for p in policies:
        if p is not None and p.discrete:
            raise ValueError("the served CLaP is Gaussian but a user policy has discrete codes (a fit of another "
                             "CLaP version)")
    z = torch.zeros(len(policies), encoder.cfg.latent_dim)
    live = [None if p is None or p.cold_start else p for p in policies]    # cold start: the prior mean 0
    heads = [i for i, p in enumerate(live) if p is not None and p.mode == "head-only"]
    if heads:
        feats = encoder.features(ids[heads], mask[heads]).float()                               # (n, Q, d)
        weight = torch.stack([live[i].tensors["weight"].float() for i in heads])                # (n, Q, d, 2D/Q)
        bias = torch.stack([live[i].tensors["bias"].float() for i in heads])                    # (n, Q, 2D/Q)
        z[heads] = predict_latent(weight, bias, feats[:, None])[:, 0].to(z.device)              # (n, D)
    by_policy: dict[int, list[int]] = {}
    for i, p in enumerate(live):
        if p is not None and p.mode != "head-only":
            by_policy.setdefault(id(p), []).append(i)
    for rows in by_policy.values():   # encoder-mode policies: their own weights, one pass per user
        mu, _ = live[rows[0]].latent(encoder, ids[rows], mask[rows])
        z[rows] = mu.float().to(z.device)
    return within_prior(z)   # as UserPolicy.serving_latent (cold-start rows are 0 and stay 0)


# ---------------------------------------------------------------------------------------------------------------
# Versions and layout
# ---------------------------------------------------------------------------------------------------------------


def user_data_hash(pairs: pa.Table) -> str:
    """Version of one user's training feedback: order-independent digest of its (prompt, chosen, rejected, weight)."""
    rows = sorted(zip(pairs["prompt"].to_pylist(), pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist(),
                      [1.0 if w is None else float(w) for w in pairs["weight"].to_pylist()]))
    return json_digest(rows)


def fit_version(clap_version: str, mode: str, data_hash: str, settings: dict[str, Any] | None = None) -> str:
    """Folder name of one fit: a function of everything the fitted policy is a function of.

    `settings` = the fit's settings (FitSettings fields: loss type, beta, steps, lr, samples, evidence ratio, noise
    draws, seed; plus min_pairs / estimator where they apply): a changed setting is a new version, so the next
    night refits the users it concerns instead of serving old artifacts as if they were the new settings.
    Without `settings` (artifacts written before they were part of it) the old layout is kept."""
    tag = "" if settings is None else f"-s{json_digest(settings)[:10]}"
    return (f"{clap_version}{tag}-{data_hash}" if mode == "head-only"
            else f"{clap_version}-{mode}{tag}-{data_hash}")


def user_folder(user_id: str) -> tuple[str, str, str]:
    """The legacy per-user folder (users/<key[:2]>/<key>/): stores from before the policy table (`migrate_legacy`)."""
    key = user_storage_key(user_id)
    return ("users", key[:2], key)


def current_clap_version(store: Store) -> str | None:
    """The store's current CLaP version (models/clap/current.json), or None before the first pretrain."""
    if not store.exists("models", "clap", "current.json"):
        return None
    return store.read_json("models", "clap", "current.json")["version"]


def policy_table(store: Store, clap_version: str | None = None):
    """The policy table of `clap_version` (default: the store's current CLaP), or None when there is no CLaP."""
    from latentpref.tasks.policy.table import PolicyTable
    clap_version = clap_version or current_clap_version(store)
    return None if clap_version is None else PolicyTable(store, clap_version)


def current_fit(store: Store, user_id: str, *, clap_version: str | None = None,
                at: str | int | None = None) -> dict[str, Any] | None:
    """The manifest of the user's fit in the policy table of `clap_version` (default: the current CLaP) at `at` (a
    tag or table version; default the latest), or None."""
    check_user_id(user_id)
    table = policy_table(store, clap_version)
    return None if table is None else table.manifests([user_id], at).get(user_id)


def load_user_policy(store: Store, user_id: str, version: str | None = None, *, clap_version: str | None = None,
                     at: str | int | None = None) -> UserPolicy | None:
    """The user's policy in the table of `clap_version` (default: the current CLaP) at `at` (default: latest), or
    None when there is none. `version` (a fit version): that fit, looked up in the latest version and then in every
    tagged night, newest first (None when no kept version has it)."""
    check_user_id(user_id)
    if version is not None and clap_version is None:
        clap_version = version.split("-", 1)[0]          # a fit version starts with its CLaP version
    table = policy_table(store, clap_version)
    if table is None:
        return None
    found = table.policies([user_id], at).get(user_id)
    if version is None or (found is not None and found.manifest.get("version") == version):
        return found
    for tag in reversed(list(table.tags())):
        found = table.policies([user_id], tag).get(user_id)
        if found is not None and found.manifest.get("version") == version:
            return found
    return None


def load_user_head(store: Store, user_id: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
    """(weight, bias, manifest) of a head-only (or cold-start) fit, or None when the user has none.

    Raises:
        ValueError: the user's current fit is a trunk-frozen / faithful policy, which has no head of its own:
            use `load_user_policy(store, user_id).latent(encoder, ids, mask)`.
    """
    policy = load_user_policy(store, user_id)
    if policy is None:
        return None
    if policy.manifest.get("artifact", HEAD_FILE) != HEAD_FILE:
        raise ValueError(f"user {user_id!r}'s current fit is a {policy.mode!r} policy, not a Gaussian head; "
                         "use load_user_policy(store, user_id).latent(clap.encoder, input_ids, attention_mask)")
    return policy.tensors["weight"], policy.tensors["bias"], policy.manifest


def seed_policy(prev: UserPolicy | None, clap_version: str, mode: str) -> UserPolicy | None:
    """`prev` if it can seed tonight's fit: same CLaP version and mode, and not a cold start."""
    if prev is None or prev.cold_start or prev.mode != mode or prev.manifest.get("clap_version") != clap_version:
        return None
    return prev


def previous_fit(store: Store, user_id: str, clap_version: str, mode: str,
                 at: str | int | None = None) -> UserPolicy | None:
    """The user's fit in `clap_version`'s table if it can seed tonight's (`seed_policy`)."""
    return seed_policy(load_user_policy(store, user_id, clap_version=clap_version, at=at), clap_version, mode)


def store_user(store: Store, user_id: str, version: str, artifact: str, tensors: dict[str, torch.Tensor],
               info: dict[str, Any]) -> dict[str, Any]:
    """Write one fit into its CLaP's policy table (one commit); returns the manifest plus the fit's `status`."""
    return store_users(store, [(user_id, version, artifact, tensors, info)])[0]


def store_users(store: Store, fits: Sequence[tuple[str, str, str, dict[str, torch.Tensor], dict[str, Any]]]
                ) -> list[dict[str, Any]]:
    """Write fits (user_id, version, artifact, tensors, info) into their CLaPs' policy tables, one commit per CLaP
    (the CLaP version is `info["clap_version"]`, else the version's prefix). Returns the records in order. The
    night does not call this: its tasks stage and its driver commits (tasks/policy/table.py)."""
    from latentpref.tasks.policy.table import PolicyTable
    by_clap: dict[str, list[int]] = {}
    for i, (user_id, version, _, _, info) in enumerate(fits):
        check_user_id(user_id)
        by_clap.setdefault(info.get("clap_version") or version.split("-", 1)[0], []).append(i)
    records: list[dict[str, Any]] = [{} for _ in fits]
    for clap_version, idx in by_clap.items():
        for i, record in zip(idx, PolicyTable(store, clap_version).write([fits[i] for i in idx])):
            records[i] = record
    return records


# ---------------------------------------------------------------------------------------------------------------
# Stores from before the policy table: users/<key[:2]>/<key>/<version>/ folders
# ---------------------------------------------------------------------------------------------------------------

MIGRATED = ("policies", "_migrated.json")


def legacy_user_folders(store: Store) -> list[tuple[str, ...]]:
    """Every legacy user folder holding a current.json pointer."""
    if not store.exists("users"):
        return []
    return [("users", shard, key) for shard in sorted(store.listdir("users"))
            for key in sorted(store.listdir("users", shard)) if store.exists("users", shard, key, "current.json")]


def migrate_legacy(store: Store, *, tag: str | None = None) -> dict[str, Any]:
    """Copy every legacy user's current fit into its CLaP's policy table (one commit and one tag per CLaP). The
    legacy files stay where they are (nothing is deleted; they are no longer read), and a marker records the
    migration so nights do not repeat it. Users already in a table with the same fit version are skipped.

    Returns {"users": n found, "migrated": n written, "tables": {clap_version: table version}}."""
    from latentpref.tasks.policy.table import PolicyTable
    folders = legacy_user_folders(store)
    fits_by_clap: dict[str, list[tuple]] = {}
    for folder in folders:
        version = store.read_json(*folder, "current.json")["version"]
        manifest = store.read_json(*folder, version, "manifest.json")
        tensors = st_load(store.read_bytes(*folder, version, manifest.get("artifact", HEAD_FILE)))
        info = {k: v for k, v in manifest.items() if k not in ("user_id", "version", "artifact", "artifact_bytes",
                                                                "written_at")}
        info.setdefault("clap_version", version.split("-", 1)[0])
        info["migrated_from"] = "/".join((*folder, version))
        info["legacy_written_at"] = manifest.get("written_at")
        fits_by_clap.setdefault(info["clap_version"], []).append(
            (manifest["user_id"], version, manifest.get("artifact", HEAD_FILE), tensors, info))
    tables, migrated = {}, 0
    for clap_version, fits in fits_by_clap.items():
        table = PolicyTable(store, clap_version)
        have = table.manifests([f[0] for f in fits])
        todo = [f for f in fits if have.get(f[0], {}).get("version") != f[1]]
        if todo:
            table.write(todo, night="migrate")
            migrated += len(todo)
        if table.exists():
            tables[clap_version] = table.tag(tag or f"migrated-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    summary = {"users": len(folders), "migrated": migrated, "tables": tables, "at": time.time()}
    store.write_json(summary, *MIGRATED)
    return summary


def needs_migration(store: Store) -> bool:
    """A store with legacy user folders and no migration marker."""
    return not store.exists(*MIGRATED) and bool(legacy_user_folders(store))
