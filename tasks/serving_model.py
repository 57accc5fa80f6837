"""Where serving models registered before tasks/ had packages find their class.

Their pickles name `tasks.serving_model.ImageClassifier`, and the project's own `tasks` package
shadows the code they shipped, so this name stays for as long as such versions may be served.
"""

from tasks.registry.serving_model import ImageClassifier

__all__ = ["ImageClassifier"]
