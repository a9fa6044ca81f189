"""Integrations of the m2kernels losses into other projects' training code.

* :mod:`m2kernels.integrations.open_clip_train`: open_clip's own trainer with the m2kernels loss,
  ``python -m m2kernels.integrations.open_clip_train <open_clip_train arguments> [--m2-mode MODE]``
  (docs/integrations.md).

Nothing here is imported by ``import m2kernels``; each integration imports its host project only
when it is used.
"""
