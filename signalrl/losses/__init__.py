"""Pure tensor losses and estimators (no models, no I/O, no state).

`advantages` (advantage estimators), `policy` (policy-gradient and value losses, log-probs
from logits), `preference` and `dpo` (preference losses), `kl`, `distill`, `reward`. The
pieces a recipe selects by name are registered in `signalrl.registry` (ADVANTAGES,
POLICY_LOSSES, PREFERENCE_LOSSES). Conventions: docs/architecture.md, "Tensor conventions".
"""
