"""A server that misbehaves with the clients' sealed states (round robin,
"server" handoff, over real gRPC): a replayed, redirected or dropped state
is refused by the client that receives it, whose weights and optimizer stay
as they were; the honest state is then taken."""

import dataclasses
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitkeras.client_process import ClientProcess
from splitkeras.transport.sealing import HandoffError, Sealer
from splitkeras.transport.turns import yield_all
from tests import base
from tests.distributed.runs import setup, thread_host, write_npz


def _state(program):
    """A client's weights and optimizer variables, copied."""
    client = program.client
    return [np.array(v) for v in client.segment.weights] + [
        np.array(v) for v in client.optimizer.variables
    ]


class MisbehavingServerTest(base.TestCase):
    def test_replay_redirect_and_reset_are_refused(self):
        root = self.tempdir()
        data = write_npz(os.path.join(root, "data.npz"), 64)
        config, _ = setup(data, weight_handoff="server")
        _, coordinator, _, connect = thread_host(
            self, config, checkpoint_dir=os.path.join(root, "checkpoints")
        )
        # The misbehaving server: BEGIN replies carry the state it chooses.
        forged = {}
        honest_begin = coordinator.begin

        def begin(message):
            reply = honest_begin(message)
            if message.client_id in forged:
                reply = dataclasses.replace(reply, state=forged[message.client_id])
            return reply

        coordinator.begin = begin
        key = AESGCM.generate_key(256)
        clients = [ClientProcess(config, k, connect, key=key) for k in range(2)]
        for client in clients:
            self.addCleanup(client.close)

        def turn(k, epoch):
            yield_all(clients[k].round(epoch))

        turn(0, 0)
        sealed_for_1 = coordinator.state.numpy()  # client 0 -> client 1, round 0
        turn(1, 0)
        sealed_for_0 = coordinator.state.numpy()  # client 1 -> client 0, round 0
        turn(0, 1)  # the honest state for client 1's turn of round 1 is stored
        before = _state(clients[1].program)
        cases = {
            "replayed": (
                sealed_for_1,
                "refuses the state handed to its turn of round 1: it is 'client 0 "
                "-> client 1, round 0', not 'client 0 -> client 1, round 1'",
            ),
            "redirected": (
                sealed_for_0,
                "received a state sealed for client 0 .* it was redirected",
            ),
            "dropped": (b"", "begins its turn of round 1 but no state was handed"),
        }
        for what, (blob, error) in cases.items():
            with self.subTest(what=what):
                forged[1] = blob
                with self.assertRaisesRegex(HandoffError, error):
                    turn(1, 1)
                self.assertWeightsClose(_state(clients[1].program), before, atol=0.0)
        del forged[1]
        turn(1, 1)  # the honest state: taken and trained on
        self.assertTrue(coordinator.done)
        after = _state(clients[1].program)
        self.assertFalse(all(np.array_equal(a, b) for a, b in zip(after, before)))
        self.assertEqual(coordinator.skipped, [])
        for client in clients:
            client.finish()


class OpenTurnTest(base.TestCase):
    """What each client accepts as the state of its turn (no TensorFlow)."""

    def test_only_the_previous_turns_state_opens(self):
        key = AESGCM.generate_key(256)
        sealers = [Sealer(key, k) for k in range(3)]
        # Client 2 ends round 4: its state opens for client 0's turn of round 5.
        self.assertEqual(sealers[0].open_turn(sealers[2].seal(b"s", 0, 4), 3, 5), b"s")
        self.assertEqual(sealers[1].open_turn(sealers[0].seal(b"s", 1, 5), 3, 5), b"s")
        refused = {
            "an older round": (sealers[0].seal(b"s", 1, 4), 1, 5),
            "a later round": (sealers[0].seal(b"s", 1, 6), 1, 5),
            "another sender": (sealers[1].seal(b"s", 0, 4), 0, 5),
            "its own state": (sealers[2].seal(b"s", 2, 4), 2, 5),
        }
        # Client 1's turn of round 5 skipped: client 2 gets what was sealed
        # for client 1.
        with self.assertRaisesRegex(HandoffError, "sealed for client 1 .* redirected"):
            sealers[2].open_turn(sealers[0].seal(b"s", 1, 5), 3, 5)
        for what, (blob, k, epoch) in refused.items():
            with self.subTest(what=what):
                with self.assertRaisesRegex(HandoffError, "stale or replayed"):
                    sealers[k].open_turn(blob, 3, epoch)


class AuthenticateTest(base.TestCase):
    """Who a call is from (no TensorFlow, no network)."""

    def test_refusals_name_the_problem(self):
        import grpc

        from splitkeras.transport.callers import Refused, authenticate

        tokens = {0: "tok0"}  # a tokens.json without client 1
        cases = [
            (
                {"x-splitkeras-client": "1", "x-splitkeras-token": "tok0"},
                1,
                (),
                grpc.StatusCode.UNAUTHENTICATED,
                "this host has no token for client 1",
            ),
            (
                {"x-splitkeras-client": "0", "x-splitkeras-token": "tok0"},
                0,
                ("client-1",),
                grpc.StatusCode.PERMISSION_DENIED,
                "the certificate of client-1 cannot call as client 0",
            ),
        ]
        for metadata, claimed, names, code, details in cases:
            with self.subTest(details=details):
                with self.assertRaises(Refused) as refused:
                    authenticate(metadata, claimed, 2, tokens, names)
                self.assertEqual(
                    (refused.exception.code, refused.exception.details),
                    (code, details),
                )
        ok = {"x-splitkeras-client": "0", "x-splitkeras-token": "tok0"}
        self.assertEqual(authenticate(ok, 0, 2, tokens, ("client-0",)), 0)

    def test_without_tokens_any_client_id_below_k_is_served(self):
        import grpc

        from splitkeras.transport.callers import Refused, authenticate

        self.assertEqual(authenticate({"x-splitkeras-client": "1"}, 1, 2, None), 1)
        cases = [
            # Mutual TLS binds the id to the certificate without tokens too.
            (
                "0",
                ("client-1",),
                grpc.StatusCode.PERMISSION_DENIED,
                "the certificate of client-1 cannot call as client 0",
            ),
            (
                "2",
                (),
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown client 2: this host serves clients 0..1",
            ),
        ]
        for raw, names, code, details in cases:
            with self.subTest(details=details):
                with self.assertRaises(Refused) as refused:
                    authenticate({"x-splitkeras-client": raw}, int(raw), 2, None, names)
                self.assertEqual(
                    (refused.exception.code, refused.exception.details),
                    (code, details),
                )


class ClientSecretsTest(base.TestCase):
    def test_each_client_holds_its_own_secrets(self):
        """The launcher's key and tokens: each client's in its own 0700
        directory (files 0600, only its own token); the same key for all;
        no key or client token file anywhere else."""
        from splitkeras import launcher
        from splitkeras.transport.sealing import read_key
        from splitkeras.transport.tokens import read_tokens

        workdir = self.tempdir()
        launcher.client_secrets(workdir, 3)
        host_args, client_args = launcher.credentials(workdir, 3)
        tokens = read_tokens(os.path.join(workdir, "credentials", "tokens.json"))
        keys = set()
        for k in range(3):
            directory = launcher.secrets_dir(workdir, k)
            self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)
            for name in ("handoff.key", "token.json"):
                path = os.path.join(directory, name)
                self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, path)
            keys.add(read_key(os.path.join(directory, "handoff.key")))
            own = os.path.join(directory, "token.json")
            self.assertEqual(read_tokens(own), {k: tokens[k]})
            self.assertIn(f"--token_file={own}", client_args[k])
            own_tls = os.path.join(directory, "tls")
            self.assertIn(f"--tls_dir={own_tls}", client_args[k])
            self.assertEqual(
                sorted(os.listdir(own_tls)),
                ["ca.pem", f"client-{k}.key", f"client-{k}.pem"],
            )
        self.assertEqual(len(keys), 1)
        launcher.client_secrets(workdir, 3)  # a restart keeps the key
        self.assertEqual(
            read_key(os.path.join(launcher.secrets_dir(workdir, 2), "handoff.key")),
            keys.pop(),
        )
        elsewhere = [
            os.path.join(root, name)
            for root, _, names in os.walk(workdir)
            for name in names
            if name in ("handoff.key", "token.json")
            and not root.endswith(os.sep + "secrets")
        ]
        self.assertEqual(elsewhere, [])
        self.assertIn(
            f"--tokens={os.path.join(workdir, 'credentials', 'tokens.json')}", host_args
        )
