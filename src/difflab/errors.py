"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class DifflabError(Exception):
    """Bad input from the user: a missing file, an unknown config key, a wrong shape, a corrupt checkpoint.

    The message names the thing at fault; the CLI prints it without a traceback.
    """
