"""Tests of splitkeras.transport.tls and .tokens: certificates, tokens and
real gRPC TLS."""

import contextlib
import ipaddress
import json
import os
import stat
from concurrent import futures

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitkeras.transport import tls
from splitkeras.transport import tokens as token_files
from tests import base

_SERVICE = "splitkeras.test.Echo"
_TIMEOUT = 5  # seconds: a failing handshake must not hang the suite.


def _load(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _echo(request, context):
    del context
    return b"echo:" + request


def _peer_name(request, context):
    """The common name of the client certificate, as the server sees it."""
    del request
    names = context.auth_context().get("x509_common_name", [])
    return names[0] if names else b""


def _identity(b):
    return b


@contextlib.contextmanager
def _serving(cert_dir, mutual=False):
    """A TLS gRPC server on 127.0.0.1 (free port); yields its address."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_identity, response_serializer=_identity
        )
        for name, fn in (("Echo", _echo), ("PeerName", _peer_name))
    }
    executor = futures.ThreadPoolExecutor(max_workers=2)
    server = grpc.server(
        executor,
        handlers=[grpc.method_handlers_generic_handler(_SERVICE, handlers)],
    )
    port = server.add_secure_port(
        "127.0.0.1:0", tls.server_credentials(cert_dir, mutual=mutual)
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()
        executor.shutdown()


def _call(channel, method="Echo", request=b"hi"):
    with channel:
        stub = channel.unary_unary(
            f"/{_SERVICE}/{method}",
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        return stub(request, timeout=_TIMEOUT)


class CertificateTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = self.tempdir()
        self.paths = tls.write_credentials(
            self.dir, hosts=("localhost", "127.0.0.1", "::1"), clients=2
        )
        self.ca = _load(self.paths["ca.pem"])

    def assertIssuedByCA(self, cert):
        self.assertEqual(cert.issuer, self.ca.subject)
        # The signature, checked by hand with the CA's public key ...
        self.ca.public_key().verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            ec.ECDSA(cert.signature_hash_algorithm),
        )
        # ... and by cryptography's own issuer check.
        cert.verify_directly_issued_by(self.ca)

    def test_writes_the_expected_files(self):
        self.assertEqual(
            set(self.paths),
            {
                "ca.pem",
                "ca.key",
                "server.pem",
                "server.key",
                "client-0.pem",
                "client-0.key",
                "client-1.pem",
                "client-1.key",
            },
        )
        for name, path in self.paths.items():
            self.assertEqual(path, os.path.join(self.dir, name))
            self.assertTrue(os.path.isfile(path), path)

    def test_private_keys_are_owner_only(self):
        for name, path in self.paths.items():
            expected = 0o600 if name.endswith(".key") else 0o644
            self.assertEqual(_mode(path), expected, name)

    def test_rewriting_keeps_keys_private(self):
        key = self.paths["server.key"]
        os.chmod(key, 0o644)
        tls.write_credentials(self.dir)
        self.assertEqual(_mode(key), 0o600)

    def test_ca_is_a_self_signed_ca(self):
        self.assertEqual(self.ca.issuer, self.ca.subject)
        self.ca.verify_directly_issued_by(self.ca)
        constraints = self.ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        self.assertTrue(
            self.ca.extensions.get_extension_for_class(
                x509.KeyUsage
            ).value.key_cert_sign
        )
        self.assertIsInstance(self.ca.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(self.ca.public_key().curve.name, "secp256r1")

    def test_server_certificate(self):
        cert = _load(self.paths["server.pem"])
        self.assertIssuedByCA(cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.value.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertFalse(
            cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        )
        # The key file holds the certificate's private key.
        with open(self.paths["server.key"], "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        self.assertEqual(key.public_key(), cert.public_key())

    def test_server_certificate_passes_path_validation(self):
        store = verification.Store([self.ca])
        builder = verification.PolicyBuilder().store(store)
        leaf = _load(self.paths["server.pem"])
        for subject in (
            verification.DNSName("localhost"),
            verification.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ):
            chain = builder.build_server_verifier(subject).verify(leaf, [])
            self.assertEqual(chain[-1], self.ca)
        with self.assertRaises(verification.VerificationError):
            builder.build_server_verifier(
                verification.DNSName("elsewhere.example")
            ).verify(leaf, [])

    def test_client_certificates(self):
        for k in range(2):
            cert = _load(self.paths[f"client-{k}.pem"])
            self.assertIssuedByCA(cert)
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            self.assertEqual([a.value for a in cn], [f"client-{k}"])
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
            self.assertEqual(list(eku.value), [ExtendedKeyUsageOID.CLIENT_AUTH])

    def test_other_ca_does_not_verify(self):
        other_key, other_cert = tls.make_ca("another CA")
        _, cert = tls.make_certificate(other_key, other_cert, "x", hosts=["localhost"])
        with self.assertRaises(ValueError):
            x509.load_pem_x509_certificate(cert).verify_directly_issued_by(self.ca)

    def test_server_certificate_needs_hosts(self):
        key, cert = tls.make_ca()
        with self.assertRaisesRegex(ValueError, "needs hosts"):
            tls.make_certificate(key, cert, "server")

    def test_missing_files_say_how_to_make_them(self):
        empty = self.tempdir()
        with self.assertRaisesRegex(
            FileNotFoundError, r"server\.key.*splitkeras make-credentials"
        ):
            tls.server_credentials(empty)
        with self.assertRaisesRegex(
            FileNotFoundError, r"ca\.pem.*splitkeras make-credentials"
        ):
            tls.channel_credentials(empty)
        with self.assertRaisesRegex(
            FileNotFoundError,
            r"client-5\.key.*splitkeras make-credentials.*--clients=6",
        ):
            tls.channel_credentials(self.dir, client_id=5)


class TokenTest(base.TestCase):
    def test_round_trip(self):
        path = os.path.join(self.tempdir(), "tokens.json")
        tokens = token_files.write_tokens(path, 3)
        self.assertEqual(len(tokens), 3)
        self.assertEqual(len(set(tokens)), 3)
        self.assertEqual(token_files.read_tokens(path), dict(enumerate(tokens)))
        self.assertEqual(_mode(path), 0o600)
        with open(path) as f:
            self.assertEqual(list(json.load(f)), ["0", "1", "2"])

    def test_tokens_are_long_and_random(self):
        token = token_files.make_token()
        self.assertGreaterEqual(len(token), 43)  # 32 bytes in URL-safe base64
        self.assertNotEqual(token, token_files.make_token())

    @base.parameterized.named_parameters(
        ("not_json", "{not json", "not valid JSON"),
        (
            "a_list",
            '["a", "b"]',
            r'holds a list; expected a JSON object \{"0": "<token>"',
        ),
        ("bad_key", '{"zero": "abc"}', "'zero' is not a client id"),
        ("bad_token", '{"0": 17}', "token of client 0 is not a non-empty string"),
        ("empty_token", '{"0": ""}', "token of client 0 is not a non-empty string"),
        ("shared_token", '{"0": "abc", "1": "abc"}', "share a token"),
        ("repeated_id", '{"0": "abc", "00": "def"}', "client 0 appears twice"),
    )
    def test_malformed_file(self, text, message):
        path = os.path.join(self.tempdir(), "tokens.json")
        with open(path, "w") as f:
            f.write(text)
        with self.assertRaisesRegex(ValueError, message) as cm:
            token_files.read_tokens(path)
        self.assertIn(path, str(cm.exception))

    def test_missing_file(self):
        with self.assertRaisesRegex(FileNotFoundError, "splitkeras make-credentials"):
            token_files.read_tokens(os.path.join(self.tempdir(), "tokens.json"))


class GrpcTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = self.tempdir()
        tls.write_credentials(self.dir, clients=1)

    def test_tls_channel_succeeds(self):
        with _serving(self.dir) as address:
            channel = grpc.secure_channel(address, tls.channel_credentials(self.dir))
            self.assertEqual(_call(channel), b"echo:hi")

    def test_plaintext_channel_fails(self):
        with _serving(self.dir) as address:
            with self.assertRaises(grpc.RpcError) as cm:
                _call(grpc.insecure_channel(address))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)

    def test_channel_trusting_another_ca_fails(self):
        other = self.tempdir()
        tls.write_credentials(other)
        with _serving(self.dir) as address:
            with self.assertRaises(grpc.RpcError) as cm:
                _call(grpc.secure_channel(address, tls.channel_credentials(other)))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)

    def test_mutual_tls_requires_a_client_certificate(self):
        with _serving(self.dir, mutual=True) as address:
            with self.assertRaises(grpc.RpcError) as cm:
                _call(grpc.secure_channel(address, tls.channel_credentials(self.dir)))
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
            channel = grpc.secure_channel(
                address, tls.channel_credentials(self.dir, client_id=0)
            )
            self.assertEqual(_call(channel), b"echo:hi")
            channel = grpc.secure_channel(
                address, tls.channel_credentials(self.dir, client_id=0)
            )
            self.assertEqual(_call(channel, "PeerName"), b"client-0")
