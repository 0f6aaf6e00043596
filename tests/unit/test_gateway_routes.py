"""Version resolution from routes, rollout and rollback."""

from __future__ import annotations

import random

import pytest

from gateway.routes import Route, RouteError, RouteTable, parse_routes, rollback, rollout, with_weights


def table(served: dict[str, set[str]], seed: int = 7) -> RouteTable:
    return RouteTable(lambda model: served.get(model, set()), rng=random.Random(seed).random)


def test_without_a_route_the_newest_served_version_answers() -> None:
    routes = table({"digits": {"1", "2", "10"}})
    assert routes.resolve("digits") == "10"


def test_explicit_version_is_served_exactly_or_not_found() -> None:
    routes = table({"digits": {"1", "2"}})
    routes.replace({"digits": Route(weights={"2": 100})})
    assert routes.resolve("digits", "1") == "1"
    with pytest.raises(RouteError, match="version '3' is not served"):
        routes.resolve("digits", "3")
    with pytest.raises(RouteError, match="not served by any worker"):
        routes.resolve("nope")


def test_weights_split_traffic() -> None:
    routes = table({"digits": {"1", "2"}})
    routes.replace({"digits": Route(weights={"1": 90, "2": 10})})
    picks = [routes.resolve("digits") for _ in range(20_000)]
    assert picks.count("2") / len(picks) == pytest.approx(0.10, abs=0.01)


def test_pin_and_unserved_route_versions() -> None:
    served = {"digits": {"1", "2"}}
    routes = table(served)
    routes.replace({"digits": Route(weights={"1": 100})})
    assert {routes.resolve("digits") for _ in range(100)} == {"1"}
    routes.replace({"digits": Route(weights={"3": 50, "1": 50})})
    assert {routes.resolve("digits") for _ in range(100)} == {"1"}
    routes.replace({"digits": Route(weights={"7": 100})})
    assert routes.resolve("digits") == "2"
    served["digits"] = {"1", "2", "7"}
    routes.endpoints_changed()
    assert routes.resolve("digits") == "7"


def test_rollout_then_rollback_restores_in_one_step() -> None:
    canary = rollout(None, "2", 10, stable="1")
    assert canary.weights == {"2": 10, "1": 90}
    more = rollout(canary, "2", 50)
    assert more.weights == {"2": 50, "1": 50}
    assert rollback(more).weights == {"2": 10, "1": 90}
    assert rollback(more).previous is None
    pinned = rollout(Route(weights={"1": 60, "3": 40}), "2", 100, stable=None)
    assert pinned.weights == {"2": 100}
    three = rollout(Route(weights={"1": 60, "3": 40}), "2", 50, stable=None)
    assert three.weights == {"2": 50, "1": 30, "3": 20}


def test_rollout_needs_another_version_and_rollback_needs_history() -> None:
    with pytest.raises(ValueError, match="--weight 100"):
        rollout(None, "2", 10, stable=None)
    with pytest.raises(ValueError, match="nothing to roll back"):
        rollback(Route(weights={"1": 100}))
    with pytest.raises(ValueError):
        rollout(None, "2", 0, stable="1")


def test_route_json_round_trip_and_invalid_entries_skipped() -> None:
    route = Route(
        weights={"1": 90, "2": 10}, policy="consistent_hash", hash_header="x-user", previous={"weights": {"1": 100}}
    )
    assert Route.from_json(__import__("json").dumps(route.to_json())) == route
    parsed = parse_routes(
        {
            "meshserve/routes/digits": b'{"weights": {"2": 100}}',
            "meshserve/routes/bad": b"{not json",
            "meshserve/routes/neg": b'{"weights": {"1": -1}}',
        },
        "meshserve/routes/",
    )
    assert set(parsed) == {"digits"}


def test_with_weights_replaces_the_weights_keeps_the_policy_and_can_be_rolled_back() -> None:
    current = Route(weights={"1": 100}, policy="consistent_hash", hash_header="x-user")
    route = with_weights(current, {"2": 30, "3": 70})
    assert dict(route.weights) == {"2": 30, "3": 70}
    assert (route.policy, route.hash_header) == ("consistent_hash", "x-user")
    assert rollback(route) == Route(weights={"1": 100}, policy="consistent_hash", hash_header="x-user")
    # With no route before, the rollback restores "no weights": the newest served version answers.
    assert rollback(with_weights(None, {"2": 100})).weights == {}


@pytest.mark.parametrize("weights", [{}, {"2": 0}, {"2": -5}])
def test_with_weights_refuses_weights_that_route_nothing(weights: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        with_weights(None, weights)
