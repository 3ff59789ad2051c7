"""Blob store for adapter files (weights, manifests), addressed by validated keys.

One concept per module; they import each other directly, never this package, so there is no
import cycle:

* ``protocol``: ``AdapterStore``, the contract every backend keeps (atomic put, verified get,
  keys validated before the backend is touched, ``StoreUnavailableError`` when it cannot be
  reached), ``StoreEntry``, and the size and checksum checks the backends share.
* ``local``: ``LocalStore``, one file per key under a directory (no boto3).
* ``s3_url``: the ``s3://bucket/prefix?...`` url grammar, ``parse_s3_url`` -> ``S3Location``
  (pure: no network, no boto3).
* ``s3_client``: connecting to S3: the client, the bucket check at opening
  (``StoreConfigError``) and the translation of boto3's faults into the store's errors.
* ``s3``: ``S3Store``, the same contract on S3-compatible object storage.
* ``factory``: ``open_store(url)``, the backend a url names.

The key grammar (``validate_key``, ``validate_prefix``) is in ``adapters.names`` beside the other
name rules; it is re-exported here with everything above but ``s3`` and ``s3_client``: only
those import boto3, and only opening an ``s3://`` url loads them, so a deployment without S3
never pays for it. ``from adapters.store.s3 import S3Store, StoreConfigError`` when S3 is meant.
"""

from adapters.names import MAX_KEY_LENGTH, SEGMENT_PATTERN, validate_key, validate_prefix
from adapters.store.factory import open_store
from adapters.store.local import TEMP_PREFIX, LocalStore
from adapters.store.protocol import AdapterStore, StoreEntry, check_size, verify_sha256
from adapters.store.s3_url import ADDRESSING_STYLES, BUCKET_PATTERN, S3Location, parse_s3_url, validate_bucket

__all__ = [
    "ADDRESSING_STYLES", "BUCKET_PATTERN", "MAX_KEY_LENGTH", "SEGMENT_PATTERN", "TEMP_PREFIX",
    "AdapterStore", "LocalStore", "S3Location", "StoreEntry", "check_size", "open_store",
    "parse_s3_url", "validate_bucket", "validate_key", "validate_prefix", "verify_sha256",
]
