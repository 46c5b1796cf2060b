"""Randomness that protects someone, below every layer that uses it.

- :mod:`securefed.noise.secure_noise`: the secret-keyed CSPRNG Gaussian (AES-256-CTR) that every
  DP mechanism draws from, the run noise key and its per-(round, client, purpose) derivation;
- :mod:`securefed.noise.discrete_gaussian`: exact discrete Gaussian sampling (Canonne, Kamath
  and Steinke 2020) for distributed DP shares in the integer domain of secure aggregation;
- :mod:`securefed.noise.prg`: the AES-256-CTR pseudorandom generator of pairwise and self masks
  (X25519 key agreement + HKDF) and the uniforms of stochastic rounding.

``privacy`` (DP-SGD, accounting) and ``secagg`` (masking, CKKS) both import these; neither
imports the other's noise code (issue 16: the privacy <-> secagg cycle).
"""
