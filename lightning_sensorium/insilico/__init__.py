"""In-silico experiments: receptive fields, tuning, size tuning, behaviour modulation and most exciting inputs of a
trained model's neurons — or of a synthetic mouse's own generator, so every experiment can be scored against the
truth. Guide: docs/insilico.md. (Imports nothing: the command line reads :data:`EXPERIMENTS` from here.)
"""

#: The experiments of ``lightning-sensorium insilico`` (``size`` runs ``rf`` and ``tuning`` first: it needs their
#: centres and preferred gratings).
EXPERIMENTS = ("rf", "gradient_rf", "tuning", "size", "behavior", "clips", "mei")
