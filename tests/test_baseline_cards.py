"""Baseline cards with values of the wrong type or broken YAML are a CardError naming the card and key
(the leaderboard used to crash later on, e.g. on n_images: many)."""

import pytest

from raebench.baselines import CardError, load_cards, parse_card

BASE = {"name": "x", "tokenizer": "x", "title": "t", "loader": "l", "source": {}, "licence": "MIT", "gated": False,
        "latent": {}, "citation": "c"}
REPORTED = {"metric": "psnr", "value": 1, "dataset": "d", "n_images": 5, "reference": "r", "source": "s"}


@pytest.mark.parametrize("card, needle", [
    ({**BASE, "gated": "maybe"}, "gated must be true or false, got 'maybe'"),
    ({**BASE, "reported": [{**REPORTED, "n_images": "many"}]}, r"reported\[0\]: n_images must be an integer or null"),
    ({**BASE, "reported": [{**REPORTED, "resolution": "high"}]}, r"reported\[0\]: resolution must be an integer"),
    ({**BASE, "reported": [{**REPORTED, "value": float("nan")}]}, "is not a finite number"),
    ({**BASE, "reported": ["abc"]}, r"reported\[0\]: expected a mapping"),
    ({**BASE, "verified": 3}, "verified must be a list"),
    ({**BASE, "verified": [{"fact": "f"}]}, r"verified\[0\]: missing key\(s\) \['where'\]"),
    ({k: v for k, v in BASE.items() if k != "name"}, r"missing key\(s\) \['name'\]"),
])
def test_wrong_types_and_missing_keys_are_card_errors(card, needle):
    with pytest.raises(CardError, match=needle):
        parse_card(card, where="c.yaml")
    assert parse_card({**BASE, "reported": [REPORTED]}).reported[0].n_images == 5


def test_broken_yaml_is_a_card_error(tmp_path):
    (tmp_path / "c.yaml").write_text("name: [x\n")
    with pytest.raises(CardError, match=r"c\.yaml: not valid YAML"):
        load_cards(str(tmp_path))


def test_the_shipped_cards_pass_the_checks():
    assert len(load_cards()) >= 10
