"""A stateful Kubernetes API on loopback, close enough to the real one for the operator.

kmock 0.8's ``KubernetesEmulator`` stores objects and replays them on list and
watch, but it is a plain JSON store: no ``uid``, ``resourceVersion``,
``generation`` or ``creationTimestamp``; every PATCH is a recursive dict merge;
no PUT; no status subresource; no selectors; and ``/api/v1/namespaces`` does not
even parse. The operator writes Secrets with owner references built from the
TokenRequest's uid and patches the status subresource, so those gaps would make
the integration tests lie. ``KubeEmulator`` keeps kmock's routing, discovery,
error rendering and object history (``emulator.objects[...]``) and replaces the
object semantics with the API server's own, as far as the operator can see them:

* metadata: ``uid``, ``resourceVersion`` (one global counter, bumped on every
  real change and never on a no-op write), ``creationTimestamp``,
  ``generation`` for custom resources (bumped only when something outside
  ``metadata`` and, with the status subresource, ``status`` changes, and when
  ``deletionTimestamp`` is set), ``generateName``, the namespace from the URL;
* writes: POST, PUT (optimistic concurrency on ``metadata.resourceVersion``),
  PATCH as JSON patch, JSON merge patch (RFC 7386) and strategic merge patch
  (built-in resources only: 415 for custom resources, as the real server);
  server-side apply is refused with 415;
* the status subresource: a write to ``/status`` changes only ``.status``, a
  write to the main resource keeps the old ``.status``, a create drops it;
* CRD structural pruning of unknown fields (and of nulls in non-nullable ones);
* DELETE with finalizers (``deletionTimestamp`` first, removal once the
  finalizers are gone), ``preconditions`` (uid, resourceVersion), and the
  garbage collector: dependents of a deleted owner are deleted, and an object
  whose owner references all point to no matching live owner (wrong uid, kind
  or name) is deleted too, as the real garbage collector does;
* LIST with ``labelSelector``, ``fieldSelector`` (any dotted field), ``limit``
  and ``continue``; WATCH with the same selectors, ``resourceVersion`` replay,
  ``sendInitialEvents`` (ending in the ``initial-events-end`` bookmark) and
  ``timeoutSeconds``;
* validation the operator could trip over: names, label keys and values, owner
  references, Secret ``data`` encoding (``stringData`` is folded into ``data``),
  a Secret's ``type`` being immutable, core Events in another namespace than
  their object, new finalizers on an object being deleted, objects in a
  namespace that does not exist;
* errors as ``Status`` objects with the real reasons (NotFound, AlreadyExists,
  Conflict, Invalid, BadRequest, UnsupportedMediaType).

What it does not do — admission, CEL and OpenAPI validation beyond pruning,
defaulting, server-side apply, managedFields, periodic watch bookmarks, 410
Gone, authentication — is what the e2e tests against a real API server are for.

The emulator runs in its own thread with its own event loop
(:class:`EmulatorServer`), so that tests may call the blocking ``kubernetes``
client directly and the operator's threads and Kopf's loop never share a loop
with it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp.test_utils
import attrs
import jsonpatch
import kmock
from kmock._internal import parsing as _kmock_parsing
from kmock._internal.rendering import Response as _KmockResponse  # not re-exported

JsonObject = dict[str, Any]
_T = TypeVar("_T")

NAMESPACES = kmock.resource("", "v1", "namespaces")
SECRETS = kmock.resource("", "v1", "secrets")
EVENTS = kmock.resource("", "v1", "events")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")

_ALL_VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the API server's own, no vowels
_INITIAL_EVENTS_END = "k8s.io/initial-events-end"
_MODIFIED = (
    "the object has been modified; please apply your changes to the latest version and try again"
)

# Lists that a strategic merge patch merges instead of replacing (the ones on the operator's
# path): the patch-merge key, or None for a set of primitives.
_STRATEGIC_LISTS: dict[tuple[str, ...], str | None] = {
    ("metadata", "ownerReferences"): "uid",
    ("metadata", "finalizers"): None,
}


# --------------------------------------------------------------------------------------------
# kmock 0.8 cannot parse /api/v1/namespaces (ValueError: not enough values to unpack) and
# reads /api/v1/namespaces/NAME as "all resources in namespace NAME". The parser is a plain
# module function that the request parser looks up at call time, so a wrapper fixes it for
# the namespaces paths only and delegates everything else unchanged.
_NAMESPACES_PATH = re.compile(
    r"^/?api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?$"
)


def _parse_path(path: str) -> _kmock_parsing.ParsedPath:
    match = _NAMESPACES_PATH.match(path)
    if match is not None:
        return _kmock_parsing.ParsedPath(
            group="",
            version="v1",
            plural="namespaces",
            namespace=None,
            name=match["name"],
            subresource=match["sub"],
        )
    return _ORIGINAL_PARSE_PATH(path)


_ORIGINAL_PARSE_PATH = getattr(
    _kmock_parsing.parse_path, "__harness_original__", _kmock_parsing.parse_path
)
_parse_path.__harness_original__ = _ORIGINAL_PARSE_PATH  # type: ignore[attr-defined]
_kmock_parsing.parse_path = _parse_path


# --------------------------------------------------------------------------------------------
# Errors, as the API server words them.


def _status_error(
    status: int,
    reason: str,
    message: str,
    *,
    resource: kmock.resource | None = None,
    name: str | None = None,
) -> kmock.KubernetesError:
    details: JsonObject = {}
    if name is not None:
        details["name"] = name
    if resource is not None:
        details["kind"] = resource.plural
        if resource.group:
            details["group"] = resource.group
    return kmock.KubernetesError(
        status=status, reason=reason, message=message, details=details or {"causes": []}
    )


def _not_found(resource: kmock.resource, name: str) -> kmock.KubernetesError:
    what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
    return _status_error(
        404, "NotFound", f'{what} "{name}" not found', resource=resource, name=name
    )


def _invalid(resource: kmock.resource, name: str | None, message: str) -> kmock.KubernetesError:
    return _status_error(
        422,
        "Invalid",
        f'{resource.plural} "{name}" is invalid: {message}',
        resource=resource,
        name=name,
    )


def _conflict(resource: kmock.resource, name: str, message: str) -> kmock.KubernetesError:
    return _status_error(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource.plural} "{name}": {message}',
        resource=resource,
        name=name,
    )


def _bad_request(message: str) -> kmock.KubernetesError:
    return _status_error(400, "BadRequest", message)


# --------------------------------------------------------------------------------------------
# Patching and pruning: pure functions of JSON values.


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: null removes a key, anything but an object replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result: JsonObject = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(
    target: Mapping[str, Any], patch: Mapping[str, Any], path: tuple[str, ...] = ()
) -> JsonObject:
    """The strategic merge patch, for the fields the operator touches (see ``_STRATEGIC_LISTS``).

    Maps merge as in a merge patch; ``ownerReferences`` merge by ``uid`` and
    ``finalizers`` as a set; ``$patch: replace|delete`` and
    ``$deleteFromPrimitiveList/<key>`` are understood; other lists are replaced.
    """
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result: JsonObject = dict(target)
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [item for item in result.get(field) or [] if item not in value]
            continue
        if key.startswith("$"):
            continue  # $retainKeys, $setElementOrder/...: order and retention are not emulated
        current = result.get(key)
        if value is None or (isinstance(value, Mapping) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(current, Mapping):
            result[key] = strategic_merge_patch(current, value, (*path, key))
        elif (
            isinstance(value, list)
            and isinstance(current, list)
            and (*path, key) in _STRATEGIC_LISTS
        ):
            result[key] = _merge_list(current, value, _STRATEGIC_LISTS[(*path, key)])
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(current: list[Any], patch: list[Any], merge_key: str | None) -> list[Any]:
    if merge_key is None:  # a set of primitives
        return [*current, *(item for item in patch if item not in current)]
    merged = [copy.deepcopy(item) for item in current]
    for item in patch:
        if not isinstance(item, Mapping):
            continue
        index = next(
            (i for i, old in enumerate(merged) if old.get(merge_key) == item.get(merge_key)), None
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del merged[index]
        elif index is None:
            merged.append(copy.deepcopy(dict(item)))
        else:
            merged[index] = strategic_merge_patch(merged[index], item)
    return merged


def prune(value: Any, schema: Any) -> Any:
    """Structural pruning as the API server does it for a CRD's openAPIV3Schema."""
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, list):
        items = schema.get("items")
        return [prune(item, items) for item in value] if isinstance(items, Mapping) else value
    if not isinstance(value, Mapping):
        return value
    properties: Mapping[str, Any] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    result: JsonObject = {}
    for key, item in value.items():
        if key in properties:
            if item is None and not properties[key].get("nullable"):
                continue
            result[key] = prune(item, properties[key])
        elif isinstance(additional, Mapping):
            result[key] = prune(item, additional)
        elif additional is True or preserve:
            result[key] = item
    return result


def _without(obj: Mapping[str, Any], *keys: str) -> JsonObject:
    return {key: value for key, value in obj.items() if key not in keys}


def _field(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    return "true" if value is True else "false" if value is False else str(value)


# --------------------------------------------------------------------------------------------
# Selectors.

Predicate = Callable[[Mapping[str, Any]], bool]
_SET_TERM = re.compile(r"^\s*(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)\s*$")


def _split_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term.strip() for term in terms if term.strip()]


def _label_check(key: str, op: str, values: frozenset[str]) -> Callable[[Mapping[str, str]], bool]:
    def check(labels: Mapping[str, str]) -> bool:
        present, value = key in labels, labels.get(key)
        match op:
            case "in" | "=":
                return present and value in values
            case "notin" | "!=":
                return value not in values  # matches objects without the key, as the API does
            case "exists":
                return present
            case _:  # "!": does not exist
                return not present

    return check


def parse_label_selector(selector: str) -> Predicate:
    """Equality-based (``=``, ``==``, ``!=``), set-based (``in``, ``notin``) and existence terms."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_terms(selector):
        match = _SET_TERM.match(term)
        if match is not None:
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            checks.append(_label_check(match["key"], match["op"], values))
        elif "!=" in term:
            key, value = (part.strip() for part in term.split("!=", 1))
            checks.append(_label_check(key, "!=", frozenset({value})))
        elif "=" in term:
            key, value = (part.strip() for part in term.replace("==", "=").split("=", 1))
            checks.append(_label_check(key, "=", frozenset({value})))
        elif term.startswith("!"):
            checks.append(_label_check(term.removeprefix("!").strip(), "!", frozenset()))
        else:
            checks.append(_label_check(term, "exists", frozenset()))

    def predicate(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return predicate


def _field_check(path: str, value: str, *, equal: bool) -> Predicate:
    def check(obj: Mapping[str, Any]) -> bool:
        return (_field(obj, path) == value) == equal

    return check


def _all(checks: list[Predicate]) -> Predicate:
    def predicate(obj: Mapping[str, Any]) -> bool:
        return all(check(obj) for check in checks)

    return predicate


def parse_field_selector(selector: str) -> Predicate:
    """``path=value``, ``path==value``, ``path!=value`` on any dotted field of the object."""
    checks: list[Predicate] = []
    for term in _split_terms(selector):
        if "!=" in term:
            path, value = (part.strip() for part in term.split("!=", 1))
            checks.append(_field_check(path, value, equal=False))
        elif "=" in term:
            path, value = (part.strip() for part in term.replace("==", "=").split("=", 1))
            checks.append(_field_check(path, value, equal=True))
        else:
            raise _bad_request(f'invalid field selector: "{term}": no operator')
    return _all(checks)


# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """One entry of the emulator's change log; watches replay it from a resourceVersion."""

    resource_version: int
    resource: kmock.resource
    namespace: str | None
    type: str  # ADDED, MODIFIED, DELETED
    object: JsonObject
    # The object before a MODIFIED: a selector watch sees an object that stops (starts)
    # matching as DELETED (ADDED), as the API server sends it.
    previous: JsonObject | None = None


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API server's object semantics (see the module docstring)."""

    enforce_namespaces: bool = True  # an object in a missing namespace is refused (404)
    garbage_collection: bool = True  # dependents and dangling-owner objects are deleted

    _schemas: dict[kmock.resource, Mapping[str, Any] | None] = attrs.field(factory=dict, init=False)
    _resource_version: int = attrs.field(default=0, init=False)
    _log: list[WatchEvent] = attrs.field(factory=list, init=False)
    _log_versions: list[int] = attrs.field(factory=list, init=False)
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _gc_scheduled: bool = attrs.field(default=False, init=False)
    # Live watch streams per resource, and when each watch started (time.monotonic()).
    watches: collections.Counter[kmock.resource] = attrs.field(
        factory=collections.Counter, init=False
    )
    watch_starts: list[tuple[float, kmock.resource]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback[kmock.method.DELETE] << self._serve_delete_collection
        self.add_resource(
            NAMESPACES, kind="Namespace", namespaced=False, subresources={"status", "finalize"}
        )

    @property
    def request_log(self) -> list[kmock.Request]:
        """Every request received so far (everyone's), oldest first."""
        return list(self._requests)

    # ---- resource registry ---------------------------------------------------------------

    def add_resource(
        self,
        resource: kmock.resource | str,
        *,
        kind: str,
        namespaced: bool,
        singular: str | None = None,
        shortnames: Iterable[str] = (),
        categories: Iterable[str] = (),
        subresources: Iterable[str] = (),
        custom: bool = False,
        schema: Mapping[str, Any] | None = None,
    ) -> kmock.resource:
        """Declare a resource for discovery, list, watch and writes (Kopf needs the core ones)."""
        resource = kmock.resource(resource)
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind,
            namespaced=namespaced,
            singular=singular or kind.lower(),
            verbs=_ALL_VERBS,
            shortnames=set(shortnames),
            categories=set(categories),
            subresources=set(subresources),
        )
        if custom:
            self._schemas[resource] = schema
        return resource

    def add_crd(self, crd: Mapping[str, Any], *, store: bool = True) -> list[kmock.resource]:
        """Declare every served version of a CustomResourceDefinition (and store the CRD object)."""
        spec = crd["spec"]
        names = spec["names"]
        declared = []
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            declared.append(
                self.add_resource(
                    kmock.resource(spec["group"], version["name"], names["plural"]),
                    kind=names["kind"],
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    singular=names.get("singular"),
                    shortnames=names.get("shortNames") or (),
                    categories=names.get("categories") or (),
                    subresources=(version.get("subresources") or {}).keys(),
                    custom=True,
                    schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                )
            )
        if store:
            body = copy.deepcopy(dict(crd))
            body.setdefault("apiVersion", "apiextensions.k8s.io/v1")
            body.setdefault("kind", "CustomResourceDefinition")
            self._store_new(CRDS, None, body)
        return declared

    def _info(self, resource: kmock.resource | None) -> kmock.ResourceInfo:
        if resource is None or resource not in self.resources or resource.plural is None:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        return self.resources[resource]

    def _kind(self, resource: kmock.resource) -> str:
        return self._info(resource).kind or (resource.plural or "").capitalize()

    @staticmethod
    def api_version(resource: kmock.resource) -> str:
        return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)

    # ---- the store -----------------------------------------------------------------------

    def read_object(
        self, resource: kmock.resource | str, namespace: str | None, name: str
    ) -> JsonObject | None:
        """The current object (a copy), or None. Call it on the emulator's loop (server.call)."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def select(
        self,
        resource: kmock.resource | str,
        namespace: str | None = None,
        predicate: Predicate | None = None,
    ) -> list[JsonObject]:
        """Live objects of a resource (all namespaces if None), in the API server's key order."""
        resource = kmock.resource(resource)
        found = [
            copy.deepcopy(obj.raw)
            for (res, ns, _), obj in self.objects.items()
            if res == resource and (namespace is None or ns == namespace) and not obj.deleted
        ]
        found = [obj for obj in found if predicate is None or predicate(obj)]
        return sorted(
            found, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"])
        )

    def _live(self) -> Iterable[tuple[kmock.resource, str | None, str, JsonObject]]:
        for (res, ns, name), obj in list(self.objects.items()):
            if not obj.deleted:
                yield res, ns, name, obj.raw

    def _next_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    def _publish(
        self,
        resource: kmock.resource,
        namespace: str | None,
        type_: str,
        obj: JsonObject,
        previous: JsonObject | None = None,
    ) -> None:
        version = int(obj["metadata"]["resourceVersion"])
        self._log.append(
            WatchEvent(version, resource, namespace, type_, copy.deepcopy(obj), previous)
        )
        self._log_versions.append(version)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _store_new(
        self, resource: kmock.resource, namespace: str | None, body: JsonObject
    ) -> JsonObject:
        meta = body["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = self._next_version()
        meta.pop("deletionTimestamp", None)
        meta.pop("deletionGracePeriodSeconds", None)
        if resource in self._schemas:
            meta["generation"] = 1
        key = (resource, namespace, meta["name"])
        if key in self.objects:
            self.objects[key].create(copy.deepcopy(body))
        else:
            self.objects[key] = copy.deepcopy(body)
        self._publish(resource, namespace, "ADDED", body)
        self._schedule_gc()
        return body

    def _store_update(
        self, resource: kmock.resource, namespace: str | None, body: JsonObject
    ) -> JsonObject:
        body["metadata"]["resourceVersion"] = self._next_version()
        history = self.objects[resource, namespace, body["metadata"]["name"]].history
        last = history[-1] if history else None
        previous: JsonObject | None = None if last is None else copy.deepcopy(dict(last))
        history.append(copy.deepcopy(body))
        self._publish(resource, namespace, "MODIFIED", body, previous)
        self._schedule_gc()
        return body

    def _store_delete(
        self, resource: kmock.resource, namespace: str | None, body: JsonObject
    ) -> JsonObject:
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = self._next_version()
        self.objects[resource, namespace, body["metadata"]["name"]].delete()
        self._publish(resource, namespace, "DELETED", body)
        self._schedule_gc()
        return body

    # ---- writes --------------------------------------------------------------------------

    def _scope(
        self, request: kmock.Request
    ) -> tuple[kmock.resource, kmock.ResourceInfo, str | None]:
        resource = request.resource
        info = self._info(resource)
        assert resource is not None
        if (
            info.namespaced
            and request.namespace is None
            and request.action != kmock.action.LIST
            and request.action != kmock.action.WATCH
        ):
            raise _status_error(
                405,
                "MethodNotAllowed",
                f"{resource.plural} are namespaced: use /namespaces/NS/{resource.plural}",
            )
        return resource, info, request.namespace if info.namespaced else None

    def _existing(self, resource: kmock.resource, namespace: str | None, name: str) -> JsonObject:
        obj = self.read_object(resource, namespace, name)
        if obj is None:
            raise _not_found(resource, name)
        return obj

    def create(
        self, resource: kmock.resource | str, namespace: str | None, body: Mapping[str, Any]
    ) -> JsonObject:
        """Create as POST does (for seeding from tests through ``server.call``)."""
        resource = kmock.resource(resource)
        info = self._info(resource)
        if not isinstance(body, Mapping):
            raise _bad_request("the body of the request was not a JSON object")
        obj: JsonObject = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        if info.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent"
                    " on the request"
                )
            meta["namespace"] = namespace
            if (
                self.enforce_namespaces
                and self.read_object(NAMESPACES, None, str(namespace)) is None
            ):
                raise _not_found(NAMESPACES, str(namespace))
            ns_obj = self.read_object(NAMESPACES, None, str(namespace))
            if ns_obj is not None and ns_obj["metadata"].get("deletionTimestamp"):
                raise _status_error(
                    403,
                    "Forbidden",
                    f"unable to create new content in namespace {namespace}"
                    " because it is being terminated",
                )
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                secrets.choice(_GENERATE_ALPHABET) for _ in range(5)
            )
        name = meta.get("name")
        if not name:
            raise _invalid(
                resource, None, "metadata.name: Required value: name or generateName is required"
            )
        if self.read_object(resource, namespace, name) is not None:
            what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
            raise _status_error(
                409,
                "AlreadyExists",
                f'{what} "{name}" already exists',
                resource=resource,
                name=name,
            )
        obj["apiVersion"] = self.api_version(resource)
        obj["kind"] = self._kind(resource)
        if meta.get("finalizers") == []:
            del meta["finalizers"]
        if "status" in info.subresources and resource in self._schemas:
            obj.pop("status", None)  # the status subresource is written through /status only
        obj = self._normalize(resource, info, name, obj, old=None)
        return self._store_new(resource, namespace, obj)

    def _update(
        self,
        resource: kmock.resource,
        info: kmock.ResourceInfo,
        namespace: str | None,
        old: JsonObject,
        new: Any,
        subresource: str | None,
    ) -> JsonObject:
        name = old["metadata"]["name"]
        if not isinstance(new, Mapping):
            raise _bad_request("the body of the request was not a JSON object")
        new = copy.deepcopy(dict(new))
        if subresource is not None and subresource not in info.subresources:
            raise _not_found(resource, f"{name}/{subresource}")
        if subresource == "status":  # only .status changes; metadata and everything else as before
            status = new.get("status")
            new = _without(copy.deepcopy(old), "status")
            if status is not None:
                new["status"] = status
        elif (
            subresource is None and "status" in info.subresources
        ):  # the main resource keeps .status
            new = _without(new, "status")
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])

        meta = new.get("metadata")
        if not isinstance(meta, dict):
            meta = new["metadata"] = {}
        if meta.get("name") not in (None, name):
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name"
                f" on the URL ({name})"
            )
        for key in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ):
            if key in old["metadata"]:
                meta[key] = old["metadata"][key]
            else:
                meta.pop(key, None)
        new["apiVersion"] = old["apiVersion"]
        new["kind"] = old["kind"]
        if meta.get("finalizers") == []:
            del meta["finalizers"]
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                raise _invalid(
                    resource,
                    name,
                    "metadata.finalizers: Forbidden: no new finalizers can be added"
                    f" if the object is being deleted, found new finalizers {sorted(added)!r}",
                )
        new = self._normalize(resource, info, name, new, old=old)

        if new == old:  # a no-op write: no new resourceVersion, no watch event
            return old
        if resource in self._schemas:
            ignored = ("metadata", "status") if "status" in info.subresources else ("metadata",)
            if _without(new, *ignored) != _without(old, *ignored):
                meta["generation"] = int(old["metadata"].get("generation", 0)) + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._store_delete(resource, namespace, new)
        return self._store_update(resource, namespace, new)

    def _normalize(
        self,
        resource: kmock.resource,
        info: kmock.ResourceInfo,
        name: str,
        body: JsonObject,
        *,
        old: JsonObject | None,
    ) -> JsonObject:
        """Validation and defaulting shared by create and update."""
        meta = body["metadata"]
        name_pattern = _DNS_LABEL if resource == NAMESPACES else _DNS_SUBDOMAIN
        if old is None and (
            not name_pattern.match(name) or len(name) > (63 if resource == NAMESPACES else 253)
        ):
            raise _invalid(
                resource,
                name,
                f'metadata.name: Invalid value: "{name}": must be a lowercase RFC 1123 name',
            )
        for key, value in (meta.get("labels") or {}).items():
            prefix, _, label = key.rpartition("/")
            if (
                (prefix and not _DNS_SUBDOMAIN.match(prefix))
                or not _LABEL_NAME.match(label)
                or len(label) > 63
            ):
                raise _invalid(
                    resource, name, f'metadata.labels: Invalid value: "{key}": invalid label key'
                )
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                raise _invalid(
                    resource,
                    name,
                    f'metadata.labels: Invalid value: "{value}": a label value must be'
                    " at most 63 characters of [-A-Za-z0-9_.], starting and ending alphanumeric",
                )
        for key, value in (meta.get("annotations") or {}).items():
            if not isinstance(value, str):
                raise _bad_request(f"metadata.annotations[{key}]: the value must be a string")
        controllers = 0
        for index, ref in enumerate(meta.get("ownerReferences") or []):
            for field in ("apiVersion", "kind", "name", "uid"):
                if not isinstance(ref, Mapping) or not ref.get(field):
                    raise _invalid(
                        resource,
                        name,
                        f"metadata.ownerReferences[{index}].{field}: Invalid value:"
                        " must not be empty",
                    )
            controllers += bool(ref.get("controller"))
        if controllers > 1:
            raise _invalid(
                resource,
                name,
                "metadata.ownerReferences: Invalid value:"
                " Only one reference can have Controller set to true",
            )

        if resource == SECRETS:
            body.setdefault("type", "Opaque")
            if old is not None and body["type"] != old.get("type", "Opaque"):
                raise _invalid(resource, name, "type: Invalid value: field is immutable")
            data = dict(body.get("data") or {})
            for key, value in (body.pop("stringData", None) or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            for key, value in data.items():
                if not _SECRET_KEY.match(key):
                    raise _invalid(
                        resource,
                        name,
                        f'data[{key}]: Invalid value: "{key}": a valid config key must'
                        ' consist of alphanumeric characters, "-", "_" or "."',
                    )
                try:
                    base64.b64decode(str(value), validate=True)
                except (binascii.Error, ValueError):
                    raise _bad_request(
                        'Secret in version "v1" cannot be handled as a Secret:'
                        f" illegal base64 data in data[{key}]"
                    ) from None
            if data or "data" in body:
                body["data"] = data
        if resource == EVENTS:
            involved = body.get("involvedObject") or {}
            if involved.get("namespace") and involved["namespace"] != meta.get("namespace"):
                raise _invalid(
                    resource,
                    name,
                    "involvedObject.namespace: Invalid value: does not match event.namespace",
                )
        if resource == NAMESPACES and old is None:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            body.setdefault("spec", {"finalizers": ["kubernetes"]})
            body.setdefault("status", {"phase": "Active"})

        schema = self._schemas.get(resource)
        if schema is not None:
            kept: JsonObject = {k: body[k] for k in ("apiVersion", "kind", "metadata") if k in body}
            body = {**kept, **prune(_without(body, "apiVersion", "kind", "metadata"), schema)}
        return body

    # ---- the GC --------------------------------------------------------------------------

    def _schedule_gc(self) -> None:
        """Collect soon after this write, as the real (asynchronous) garbage collector would."""
        if self.garbage_collection and not self._gc_scheduled:
            self._gc_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self._collect_garbage)
            except RuntimeError:  # no loop (seeding before serving): collect right away
                self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Delete objects whose owners are all gone; drop dangling references beside live owners."""
        self._gc_scheduled = False
        live = list(self._live())
        by_uid = {obj["metadata"].get("uid"): (res, ns, obj) for res, ns, _, obj in live}
        for res, ns, name, obj in live:
            refs = obj["metadata"].get("ownerReferences") or []
            if not refs or obj["metadata"].get("deletionTimestamp"):
                continue
            solid = [ref for ref in refs if self._owner_exists(ref, ns, by_uid)]
            if solid == refs:
                continue
            if solid:
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = solid
                self._store_update(res, ns, new)
            else:
                self._delete(res, ns, name, propagation="Background")

    @staticmethod
    def _owner_exists(
        ref: Mapping[str, Any], namespace: str | None, by_uid: Mapping[str, Any]
    ) -> bool:
        found = by_uid.get(ref.get("uid"))
        if found is None:
            return False
        owner_resource, owner_namespace, owner = found
        return bool(
            owner.get("kind") == ref.get("kind")
            and owner["metadata"]["name"] == ref.get("name")
            and str(ref.get("apiVersion", "")).rpartition("/")[0] == owner_resource.group
            and owner_namespace in (None, namespace)
        )

    def _delete(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        *,
        propagation: str | None,
        preconditions: Mapping[str, Any] | None = None,
    ) -> JsonObject:
        old = self._existing(resource, namespace, name)
        meta = old["metadata"]
        for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            expected = (preconditions or {}).get(field)
            if expected and expected != meta.get(field):
                raise _conflict(
                    resource,
                    name,
                    f"Precondition failed: {label} in precondition: {expected},"
                    f" {label} in object meta: {meta.get(field)}",
                )
        if propagation == "Orphan":
            for res, ns, _, obj in list(self._live()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == meta["uid"] for ref in refs):
                    new = copy.deepcopy(obj)
                    new["metadata"]["ownerReferences"] = [
                        ref for ref in refs if ref.get("uid") != meta["uid"]
                    ] or None
                    if new["metadata"]["ownerReferences"] is None:
                        del new["metadata"]["ownerReferences"]
                    self._store_update(res, ns, new)
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            if "generation" in meta:
                new["metadata"]["generation"] = int(meta["generation"]) + 1
            return self._store_update(resource, namespace, new)
        self._store_delete(resource, namespace, old)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": name,
                "group": resource.group,
                "kind": resource.plural,
                "uid": meta["uid"],
            },
        }

    # ---- kmock's entry points ------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle: it mutates the store before routing, with its own
        # semantics. Here the store changes in the fallback reactions below, so a reaction that
        # a test adds in front (e.g. ``emulator['patch', kmock.resource('v1/secrets')] << 500``)
        # fails the request without changing anything, as a failed request does.
        return await kmock.RawHandler._handle(self, request)

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        resource, _, namespace = self._scope(request)
        created = self.create(resource, namespace, request.data)
        return _KmockResponse(status=201, payload=created)

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        resource, info, namespace = self._scope(request)
        assert request.name is not None
        if request.subresource is not None and request.subresource not in info.subresources:
            raise _not_found(resource, f"{request.name}/{request.subresource}")
        return self._existing(resource, namespace, request.name)

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        resource, info, namespace = self._scope(request)
        assert request.name is not None
        old = self._existing(resource, namespace, request.name)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        patch = request.data
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _bad_request("a JSON patch must be a list of operations")
            try:
                new = jsonpatch.apply_patch(old, patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                raise _invalid(
                    resource, request.name, f"the JSON patch could not be applied: {error}"
                ) from None
        elif content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            if not isinstance(patch, Mapping):
                raise _bad_request("a merge patch must be a JSON object")
            precondition = (patch.get("metadata") or {}).get("resourceVersion")
            if precondition and precondition != old["metadata"]["resourceVersion"]:
                raise _conflict(
                    resource,
                    request.name,
                    _MODIFIED,
                )
            if content_type == "application/merge-patch+json":
                new = merge_patch(old, patch)
            elif resource in self._schemas:
                raise _status_error(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types"
                    " include: application/json-patch+json, application/merge-patch+json,"
                    " application/apply-patch+yaml",
                )
            else:
                new = strategic_merge_patch(old, patch)
        else:
            raise _status_error(
                415,
                "UnsupportedMediaType",
                f"the emulator does not support the patch type {content_type!r}"
                " (server-side apply is not emulated)",
            )
        return self._update(resource, info, namespace, old, new, request.subresource)

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        resource, info, namespace = self._scope(request)
        if request.name is None:
            raise _status_error(405, "MethodNotAllowed", "PUT needs an object URL")
        old = self._existing(resource, namespace, request.name)
        body = request.data
        if not isinstance(body, Mapping):
            raise _bad_request("the body of the request was not a JSON object")
        precondition = (body.get("metadata") or {}).get("resourceVersion")
        if precondition and precondition != old["metadata"]["resourceVersion"]:
            raise _conflict(
                resource,
                request.name,
                _MODIFIED,
            )
        return self._update(resource, info, namespace, old, body, request.subresource)

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        resource, _, namespace = self._scope(request)
        assert request.name is not None
        options = request.data if isinstance(request.data, Mapping) else {}
        propagation = options.get("propagationPolicy") or request.params.get("propagationPolicy")
        return self._delete(
            resource,
            namespace,
            request.name,
            propagation=propagation,
            preconditions=options.get("preconditions"),
        )

    async def _serve_delete_collection(self, request: kmock.Request) -> kmock.Payload:
        resource, _, namespace = self._scope(request)
        if request.name is not None:
            raise _status_error(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        for obj in self.select(resource, namespace, self._predicate(request)):
            self._delete(resource, namespace, obj["metadata"]["name"], propagation=None)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

    def _predicate(self, request: kmock.Request) -> Predicate:
        checks: list[Predicate] = []
        if request.params.get("labelSelector"):
            checks.append(parse_label_selector(request.params["labelSelector"]))
        if request.params.get("fieldSelector"):
            checks.append(parse_field_selector(request.params["fieldSelector"]))
        if request.name is not None:  # a watch on a single object
            checks.append(_field_check("metadata.name", request.name, equal=True))
        return _all(checks)

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        resource, _, namespace = self._scope(request)
        items = self.select(resource, namespace, self._predicate(request))
        version = str(self._resource_version)
        offset = 0
        if request.params.get("continue"):
            try:
                version, _, position = (
                    base64.urlsafe_b64decode(request.params["continue"]).decode().partition(":")
                )
                offset = int(position)
            except (ValueError, binascii.Error):
                raise _bad_request("invalid continue token") from None
        limit = int(request.params.get("limit") or 0)
        metadata: JsonObject = {"resourceVersion": version}
        if limit and offset + limit < len(items):
            token = f"{version}:{offset + limit}".encode()
            metadata["continue"] = base64.urlsafe_b64encode(token).decode()
            metadata["remainingItemCount"] = len(items) - offset - limit
        page = items[offset : offset + limit] if limit else items[offset:]
        return {
            "apiVersion": self.api_version(resource),
            "kind": f"{self._kind(resource)}List",
            "metadata": metadata,
            "items": page,
        }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        resource, _, namespace = self._scope(request)
        predicate = self._predicate(request)
        since = request.params.get("resourceVersion") or ""
        initial = request.params.get("sendInitialEvents") == "true"
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        if since not in ("", "0") and not since.isdigit():
            raise _bad_request(f"invalid resourceVersion: {since!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None

        yield b""  # send the headers now: a watch with nothing to say is still a watch
        self.watches[resource] += 1
        self.watch_starts.append((time.monotonic(), resource))
        try:
            if (
                since in ("", "0") or initial
            ):  # "most recent" semantics: current state, then changes
                position = len(self._log)
                for obj in self.select(resource, namespace, predicate):
                    yield {"type": "ADDED", "object": obj}
                if initial:
                    yield {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": self._kind(resource),
                            "apiVersion": self.api_version(resource),
                            "metadata": {
                                "resourceVersion": str(self._resource_version),
                                "annotations": {_INITIAL_EVENTS_END: "true"},
                            },
                        },
                    }
            else:
                position = bisect.bisect_right(self._log_versions, int(since))
            transport = request._raw_request.transport if request._raw_request is not None else None
            while True:
                while position < len(self._log):
                    event = self._log[position]
                    position += 1
                    if event.resource != resource or namespace not in (None, event.namespace):
                        continue
                    matches = predicate(event.object)
                    kind = event.type
                    if kind == "MODIFIED" and event.previous is not None:
                        matched = predicate(event.previous)
                        if matched and not matches:
                            kind, matches = "DELETED", True  # stopped matching the selector
                        elif matches and not matched:
                            kind = "ADDED"  # started matching it
                    if matches:
                        yield {"type": kind, "object": copy.deepcopy(event.object)}
                remaining = deadline - loop.time() if deadline is not None else 0.5
                if remaining <= 0 or transport is None or transport.is_closing():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
        finally:
            self.watches[resource] -= 1


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------


class EmulatorServer:
    """A :class:`KubeEmulator` served on http://127.0.0.1:<free port> from its own thread."""

    def __init__(self, setup: Callable[[KubeEmulator], None] | None = None) -> None:
        self._setup = setup
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.emulator: KubeEmulator | None = None
        self.port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the Kubernetes emulator did not start")
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._error

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def call(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run ``function`` on the emulator's loop (a consistent store); return its result."""
        assert self._loop is not None

        async def invoke() -> _T:
            return function(*args, **kwargs)

        future: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(
            invoke(), self._loop
        )
        return future.result(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # surfaces in start() or is visible in the thread's death
            self._error = error
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with KubeEmulator() as emulator:
            if self._setup is not None:
                self._setup(emulator)
            # aiohttp's own test server, not kmock.Server: that one also patches aiohttp's DNS
            # resolution process-wide, which Kopf's aiohttp client in another thread would share.
            server = aiohttp.test_utils.RawTestServer(emulator, host="127.0.0.1", port=0)
            await server.start_server()
            try:
                self.emulator = emulator
                self.port = server.port or 0
                self._started.set()
                await self._stop.wait()
            finally:
                await server.close()


def dump(obj: Any) -> str:
    """Compact JSON for assertion messages."""
    return json.dumps(obj, sort_keys=True, default=str)
