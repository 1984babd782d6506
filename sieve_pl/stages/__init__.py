"""The pipeline's stages, one module each, and what each may import.

A stage module imports ``stage.py`` and the other modules every stage shares (``SHARED``), lower
layers (``sieve_pl.models``, ``sieve_pl.units``, ``sieve_pl.tasks``, ``sieve_pl.maths``,
``sieve_pl.training``, ``sieve_pl.io``…) and its own sub-parts (``PARTS``): never another
stage, nor another stage's part. What two stages need moves below them or into a shared module,
so each stage reads top to bottom and no import goes round in a circle
(``tests/test_layout.py`` checks both).

Shared by every stage:

- ``stage``: the Stage protocol, its Context, the results stages hand each other (and
  ``levels_at``, which reads the search's price path: confirmation steps back along it);
- ``search_config``: the search's settings (ε and its bounds), which the search, its GA,
  confirmation and the evaluation read;
- ``fitness``: scoring levels on a labelled split (the search selects with it, confirmation
  checks the result with it).

Sub-parts (each imports only shared modules and lower layers):

- ``search`` owns ``genetic`` (the GA) and ``sensitivity`` (the seed's costs and price path);
- ``project`` owns ``learned`` (the gradient-descent fit of ``method: learned``).
"""

SHARED = ("stage", "search_config", "fitness")
PARTS = {"search": ("genetic", "sensitivity"), "project": ("learned",)}
