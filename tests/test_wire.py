"""The wire contract: every error code has one class, errors cross the wire and come back,
validation and unexpected errors never leak input or exception text, secrets stay out of reprs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

import broker.server.daemon  # noqa: F401 - imports every module that registers a route
from broker.server.dispatch import to_wire_error
from broker.server.operations import OPERATIONS as ROUTES
from broker.wire import errors
from broker.wire.errors import ERRORS, ApmError, InternalError, error_from_wire
from broker.wire.protocol import (
    METHODS,
    Auth,
    EntryAddParams,
    EntryListParams,
    ErrorBody,
    PasswdParams,
    Request,
)

SECRET = "sk-live-9f8e7d6c5b4a-DO-NOT-LEAK"


def _all_subclasses(cls: type[ApmError]) -> set[type[ApmError]]:
    out: set[type[ApmError]] = set()
    for sub in cls.__subclasses__():
        out.add(sub)
        out |= _all_subclasses(sub)
    return out


def _camel(code: str) -> str:
    return "".join(part.capitalize() for part in code.split("_"))


def _validation_error(model: type[BaseModel], doc: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(doc)
    return info.value


# ------------------------------------------------------------------ the error table


def test_every_code_maps_to_a_class_carrying_that_code() -> None:
    assert ERRORS, "the error table is empty"
    for code, cls in ERRORS.items():
        assert issubclass(cls, ApmError)
        assert cls.code == code


def test_every_error_class_has_its_own_code_in_the_table() -> None:
    subclasses = _all_subclasses(ApmError)
    missing = sorted(c.__name__ for c in subclasses if ERRORS.get(c.code) is not c)
    assert missing == [], f"classes without their own code in ERRORS: {missing}"
    assert len(ERRORS) == len(subclasses)


def test_every_public_error_class_in_the_module_is_mapped() -> None:
    module_classes = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, ApmError) and obj is not ApmError
    }
    assert module_classes == set(ERRORS.values())


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_error_class_is_named_after_its_code(code: str) -> None:
    assert ERRORS[code].__name__ == _camel(code)


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_error_class_has_an_exit_code_and_a_lowercase_message_without_period(code: str) -> None:
    cls = ERRORS[code]
    assert isinstance(cls.exit_code, int)
    assert 1 <= cls.exit_code <= 255
    message = cls.default_message
    assert message
    assert message[0] == message[0].lower()
    assert not message.endswith(".")


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_error_from_wire_round_trips_each_code(code: str) -> None:
    err = error_from_wire(code, "some message", "some hint", {"k": 1})
    assert type(err) is ERRORS[code]
    assert err.code == code
    assert err.message == "some message"
    assert err.hint == "some hint"
    assert err.data == {"k": 1}


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_an_error_sent_by_the_broker_arrives_as_the_same_class(code: str) -> None:
    original = ERRORS[code](data={"n": 2})
    body = ErrorBody.model_validate_json(to_wire_error(original).model_dump_json())
    back = error_from_wire(body.code, body.message, body.hint, body.data)
    assert type(back) is type(original)
    assert back.message == original.message
    assert back.hint == original.hint
    assert back.data == {"n": 2}


def test_an_unknown_wire_code_becomes_internal_error_keeping_the_code() -> None:
    err = error_from_wire("NOT_A_REAL_CODE", "m")
    assert type(err) is InternalError
    assert err.data["code"] == "NOT_A_REAL_CODE"


# ------------------------------------------------------------------ to_wire_error


@pytest.mark.parametrize(
    ("model", "doc", "field"),
    [
        # a secret-looking value where a number belongs
        (EntryListParams, {"offset": SECRET}, "offset"),
        # a secret-looking value that breaks a pattern
        (EntryListParams, {"space": SECRET + " !"}, "space"),
        # a secret passed under a field that does not exist
        (EntryAddParams, {"type": "login", "name": "x", "password": SECRET}, "password"),
        # a nested secret of the wrong shape
        (
            EntryAddParams,
            {"type": "login", "name": "x", "secrets": {"password": {"value": SECRET, "x": 1}}},
            "secrets.password.x",
        ),
        # an over-long secret
        (PasswdParams, {"new_password": SECRET * 1000}, "new_password"),
        # a whole request envelope with a bad auth block
        (
            Request,
            {"v": 1, "method": "vault.unlock", "auth": {"password": SECRET, "pin": SECRET}},
            "auth.pin",
        ),
    ],
)
def test_validation_error_becomes_invalid_parameters_naming_fields_not_values(
    model: type[BaseModel], doc: dict[str, Any], field: str
) -> None:
    body = to_wire_error(_validation_error(model, doc))
    assert body.code == "INVALID_PARAMETERS"
    assert field in body.data["fields"]
    assert field in body.message
    wire = body.model_dump_json()
    assert SECRET not in wire
    assert SECRET[:16] not in wire
    assert SECRET not in repr(body)


def test_unexpected_exception_becomes_internal_error_without_its_text() -> None:
    body = to_wire_error(RuntimeError(f"boom while handling {SECRET}"))
    assert body.code == "INTERNAL_ERROR"
    wire = body.model_dump_json()
    assert SECRET not in wire
    assert "boom" not in wire
    assert "RuntimeError" not in wire
    assert "Traceback" not in wire


def test_apm_errors_keep_code_message_hint_and_data_on_the_wire() -> None:
    body = to_wire_error(errors.VaultLocked(data={"x": 1}))
    assert body.code == "VAULT_LOCKED"
    assert body.hint == errors.VaultLocked.default_hint
    assert body.data == {"x": 1}


# ------------------------------------------------------------------ requests and secrets


def _secret_request() -> Request:
    return Request(
        v=1,
        method="vault.passwd",
        params={"new_password": "params-" + SECRET},
        auth=Auth(password=SecretStr("pw-" + SECRET), token=SecretStr("eps_" + SECRET)),
        client="test",
    )


def test_request_encode_reveals_auth_secrets_to_the_broker() -> None:
    doc = json.loads(_secret_request().encode())
    assert doc["auth"]["password"] == "pw-" + SECRET
    assert doc["auth"]["token"] == "eps_" + SECRET
    assert doc["params"]["new_password"] == "params-" + SECRET


@pytest.mark.parametrize("render", [repr, str], ids=["repr", "str"])
def test_request_repr_and_str_hide_auth_secrets_and_params(render: Any) -> None:
    text = render(_secret_request())
    assert "vault.passwd" in text  # it does render the request
    assert SECRET not in text


def test_request_default_serialisation_masks_auth_secrets() -> None:
    text = _secret_request().model_dump_json()
    assert "pw-" + SECRET not in text
    assert "eps_" + SECRET not in text


def test_secret_params_models_hide_values_in_repr_and_default_dump() -> None:
    params = PasswdParams(new_password=SecretStr(SECRET))
    assert SECRET not in repr(params)
    assert SECRET not in params.model_dump_json()
    assert SECRET in params.model_dump_json(context={"reveal": True})


# ------------------------------------------------------------------ routes


def test_every_wire_method_has_a_route() -> None:
    assert sorted(set(METHODS) - set(ROUTES)) == []


def test_every_route_is_a_wire_method() -> None:
    assert sorted(set(ROUTES) - set(METHODS)) == []


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_route_validates_with_the_methods_params_model(method: str) -> None:
    route = ROUTES.get(method)
    assert route is not None, f"{method} has no route"
    assert route.params is METHODS[method][0]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_names_read_noun_dot_verb(method: str) -> None:
    noun, _, verb = method.partition(".")
    assert noun.isidentifier()
    assert verb.isidentifier()


def test_approval_pending_has_an_exit_code_of_its_own() -> None:
    # a script must tell "held for the person" from every failure by the exit code alone
    from broker.wire.errors import ERRORS, ApprovalPending

    others = {cls.exit_code for code, cls in ERRORS.items() if cls is not ApprovalPending}
    assert ApprovalPending.exit_code not in others
    assert ApprovalPending.exit_code not in (0, 1, 2)
