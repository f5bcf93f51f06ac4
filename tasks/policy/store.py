"""The one home of a user's stored p_theta(z|x): layout, versions, the current pointer, load/store, and the latent
type of CLaPs and policies (every "is it discrete?" decision of the project is made by the functions here).

Layout: users/<key[:2]>/<key>/<version>/{<artifact>, manifest.json} plus users/<key[:2]>/<key>/current.json
pointing at the newest fit. version = <clap_version>[-s<settings>]-<data_hash> for head-only (the original layout, so
existing fits stay valid) and <clap_version>-<mode>[-s<settings>]-<data_hash> for the other modes (discrete CLaPs:
mode `codes-<estimator>`). The artifact is `head.safetensors` (head-only and every Gaussian cold start: the zero head
= the prior), `policy.safetensors` (trunk-frozen / faithful: the mode's trained tensors, named as in
`LatentEncoder`) or `codes.safetensors` (discrete CLaPs: {"delta": (K,)}; cold start delta = 0 = the CLaP prior).
The folder name derives from (user, CLaP version, mode, settings, data version), and every file is written
atomically with the manifest last and the pointer after it, so a retried task rewrites identical bytes and a
reader never sees half an artifact.

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
from safetensors.torch import save as st_save

from latentpref.tasks.data.store import Store, json_bytes, json_digest
from latentpref.tasks.data.validate import user_storage_key
from latentpref.tasks.models.policy import policy_latent, predict_latent, user_code_probs, user_latent
from latentpref.tasks.models.latent import bounded_logvar, within_prior

__all__ = ["CODES_FILE", "CODES_MODE", "ENCODER_MODES", "HEAD_FILE", "MODES", "POLICY_FILE", "UserPolicy",
           "current_fit", "fit_version", "is_discrete", "latents", "load_user_head", "load_user_policy",
           "previous_fit", "prior_latent", "read_policy", "store_user", "store_users", "user_data_hash",
           "user_folder"]

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
    key = user_storage_key(user_id)
    return ("users", key[:2], key)


def current_fit(store: Store, user_id: str) -> dict[str, Any] | None:
    """The manifest of the user's newest stored fit, or None."""
    folder = user_folder(user_id)
    if not store.exists(*folder, "current.json"):
        return None
    pointer = store.read_json(*folder, "current.json")
    return store.read_json(*folder, pointer["version"], "manifest.json")


def read_policy(store: Store, user_id: str, manifest: dict[str, Any]) -> UserPolicy:
    """The policy a manifest describes (any version of the user's, not only the current one)."""
    tensors = st_load(store.read_bytes(*user_folder(user_id), manifest["version"], manifest.get("artifact", HEAD_FILE)))
    return UserPolicy(manifest.get("mode", "head-only"), tensors, manifest)


def load_user_policy(store: Store, user_id: str, version: str | None = None) -> UserPolicy | None:
    """The user's current policy (or the one of `version`), or None when there is none."""
    if version is not None:
        folder = user_folder(user_id)
        if not store.exists(*folder, version, "manifest.json"):
            return None
        return read_policy(store, user_id, store.read_json(*folder, version, "manifest.json"))
    manifest = current_fit(store, user_id)
    return None if manifest is None else read_policy(store, user_id, manifest)


def load_user_head(store: Store, user_id: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
    """(weight, bias, manifest) of a head-only (or cold-start) fit, or None when the user has none.

    Raises:
        ValueError: the user's current fit is a trunk-frozen / faithful policy, which has no head of its own:
            use `load_user_policy(store, user_id).latent(encoder, ids, mask)`.
    """
    manifest = current_fit(store, user_id)
    if manifest is None:
        return None
    if manifest.get("artifact", HEAD_FILE) != HEAD_FILE:
        raise ValueError(f"user {user_id!r}'s current fit is a {manifest.get('mode')!r} policy, not a Gaussian head; "
                         "use load_user_policy(store, user_id).latent(clap.encoder, input_ids, attention_mask)")
    tensors = read_policy(store, user_id, manifest).tensors
    return tensors["weight"], tensors["bias"], manifest


def previous_fit(store: Store, user_id: str, clap_version: str, mode: str) -> UserPolicy | None:
    """The user's current fit if it can seed tonight's: same CLaP version and mode, and not a cold start."""
    prev = load_user_policy(store, user_id)
    if prev is None or prev.cold_start or prev.mode != mode or prev.manifest.get("clap_version") != clap_version:
        return None
    return prev


def store_user(store: Store, user_id: str, version: str, artifact: str, tensors: dict[str, torch.Tensor],
               info: dict[str, Any]) -> dict[str, Any]:
    """Write one fit (artifact, manifest, then the current pointer); returns the manifest plus the fit's `status`."""
    folder = user_folder(user_id)
    blob = st_save({k: v.detach().float().contiguous() for k, v in tensors.items()},
                   metadata={"user_id": user_id, "version": version})
    store.write_bytes(blob, *folder, version, artifact)
    manifest = {"user_id": user_id, "version": version, "artifact": artifact, "artifact_bytes": len(blob),
                "written_at": time.time(), **info}
    store.write_json(manifest, *folder, version, "manifest.json")
    store.write_json({"version": version}, *folder, "current.json")   # pointer flips last
    return {**manifest, "status": "fitted" if not info.get("cold_start") else "cold_start"}


def store_users(store: Store, fits: Sequence[tuple[str, str, str, dict[str, torch.Tensor], dict[str, Any]]]
                ) -> list[dict[str, Any]]:
    """`store_user` for many fits (user_id, version, artifact, tensors, info) at once, as a chunk of a night writes
    them: every artifact and manifest (one `Store.write_many`: one sync for all), then every current pointer (a
    second one), so no pointer ever names a version that is not complete and durable. Returns the records."""
    files: list[tuple[bytes, tuple[str, ...]]] = []
    pointers: list[tuple[bytes, tuple[str, ...]]] = []
    records = []
    for user_id, version, artifact, tensors, info in fits:
        folder = user_folder(user_id)
        blob = st_save({k: v.detach().float().contiguous() for k, v in tensors.items()},
                       metadata={"user_id": user_id, "version": version})
        manifest = {"user_id": user_id, "version": version, "artifact": artifact, "artifact_bytes": len(blob),
                    "written_at": time.time(), **info}
        files += [(blob, (*folder, version, artifact)), (json_bytes(manifest), (*folder, version, "manifest.json"))]
        pointers.append((json_bytes({"version": version}), (*folder, "current.json")))
        records.append({**manifest, "status": "fitted" if not info.get("cold_start") else "cold_start"})
    store.write_many(files)
    store.write_many(pointers)      # pointers flip last
    return records
