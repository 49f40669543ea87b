"""The CRF's input error: a UserError (one-line message for the command lines) that is also a ValueError."""
from deeplab_lit.errors import UserError


class CRFInputError(UserError, ValueError):
    """Bad probabilities, image or parameters given to the CRF; the message names the problem."""
