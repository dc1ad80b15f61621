"""Mutation checks: do the fast tests fail when the code is wrong?

``python -m benchmarks.mutation`` (``make mutation``) runs two parts:

- ``named``: defects the fast tests once let through, each applied by exact text
  replacement to a temporary copy of the tree; every one must make a fast test fail.
- ``score``: mutmut over the rollout, the launcher, the gate, the smoke check and the
  samplers, against their fast test files; killed / survived / timeout per target.

``targets`` says what is checked and by which tests; ``named`` and ``score`` run the parts.
"""
