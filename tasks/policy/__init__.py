"""A user's stored policy p_theta(z|x): where it lives and how it is read (store.py), the user-independent latent
cache the fits read (cache.py), the fit settings that cross the Ray boundary (settings.py) and the like-for-like
one-user refit the evaluation times (refit.py). The policy's forward is tasks/models/policy.py."""
