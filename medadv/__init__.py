"""medadv: attack, measure and defend medical imaging AI.

The package mirrors the flow of a study: ``data`` (medical images and tasks) -> ``models`` (wrapper,
zoo, checkpoints, training) -> ``attacks`` (one threat model, one module per attack) -> ``evaluate``
(clinical metrics, perceptibility, the battery) -> ``report`` (results.json, figures, report.html);
``provenance`` signs and verifies images before any model sees them; ``cli`` is the command line.
"""

__version__ = "0.1.0"
