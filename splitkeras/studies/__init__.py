"""Studies: runs that train and attack a config many times and compare.

- `privacy_report`: one run per defense setting (NoPeek alpha, activation
  noise), each attacked (reconstruction, model completion).
- `cut_advisor`: one short run per cut point, with its costs and leakage,
  and the cut that meets a user's budgets.

They sit above `splitkeras.experiment` (they call `train_and_evaluate`), so
`splitkeras.privacy`, which the parties import, does not import them.
"""
