"""The one exception type media preprocessing raises for bad or unfittable input."""


class MediaError(ValueError):
    """An image or audio input that cannot be used; the message is safe to show to the user."""
