"""The one exception type for errors a user can cause and fix."""


class PrefkdError(Exception):
    """An error the user can fix; its message is one sentence."""
