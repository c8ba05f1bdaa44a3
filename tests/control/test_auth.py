"""What of an API key may be shown: its prefix, wherever the key was pasted."""

from __future__ import annotations

from control.services.auth import redact_keys, shown_prefix

KEY = "cvn_0123abcd_" + "Zq-9_x" * 7 + "A"  # a generated key's shape: prefix, "_", token_urlsafe(32)
SHOWN = "cvn_0123abcd_<redacted>"


def test_a_generated_key_is_cut_to_its_prefix_wherever_it_is_in_a_text() -> None:
    cases = {
        KEY: SHOWN,
        f"/v1/agents/{KEY}": f"/v1/agents/{SHOWN}",
        f"/v1/agents/{KEY}/job": f"/v1/agents/{SHOWN}/job",
        f"customer_id={KEY}&limit=5": f"customer_id={SHOWN}&limit=5",
        f"agent '{KEY}' not found; task '{KEY}'": f"agent '{SHOWN}' not found; task '{SHOWN}'",
        f"x{KEY}.json": f"x{SHOWN}.json",
    }
    for text, shown in cases.items():
        assert redact_keys(text) == shown, text
        assert redact_keys(shown) == shown  # what is shown is shown again as it is
    assert redact_keys(KEY) == shown_prefix(KEY)
    for untouched in ("cvn_0123abcd", "/v1/admin/keys/cvn_0123abcd", "cvn_0123abcd_", "ag-0123456789ab", "cvn_xyz_abc"):
        assert redact_keys(untouched) == untouched
