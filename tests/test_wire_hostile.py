"""Hostile messages (``protocol.wire``, ``protocol.codecs``): an escaping patient id and a top-k header of huge
dimensions are protocol errors naming the site and the field."""

import pytest
from hostile import topk_message

from split_unet.errors import ProtocolError
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_REQUEST, TensorMessage

pytestmark = pytest.mark.unit


def test_a_message_naming_an_escaping_patient_is_refused():
    message = TensorMessage(KIND_REQUEST, 1, ["../../ESCAPED"])
    with pytest.raises(ProtocolError, match="site 'flair', field 'patient_ids': patient id '../../ESCAPED'"):
        TensorMessage.from_shareable(message.to_shareable("float32")[0], KIND_REQUEST, site="flair")


def test_a_topk_header_of_huge_dimensions_is_a_protocol_error_naming_the_site():
    with pytest.raises(ProtocolError, match=r"site 'flair', field 'split_unet.activations\[0\].shape'"):
        TensorMessage.from_shareable(topk_message([0, 2**62, 2**62]), KIND_ACTIVATIONS, site="flair")

