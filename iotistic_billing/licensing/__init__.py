"""Licences of customer instances: plan catalog, signing keys, minting, audit history and the verifier.

Nothing is imported here on purpose: `verifier` must stay importable on a customer instance that has
only pyjwt and cryptography installed (orjson and pybase64 make it faster when present), so each module
is imported by its full name.
"""
