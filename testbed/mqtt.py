"""Where and how to reach the MQTT broker: one endpoint type and the aiomqtt client built from it."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace

import aiomqtt

from testbed.scenario import BrokerSpec

MQTT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MqttEndpoint:
    """A broker address (possibly a channel proxy in front of it) with credentials and TLS."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_enabled: bool = False
    tls_verify_certificate: bool = True
    tls_check_hostname: bool = True

    @classmethod
    def from_spec(cls, spec: BrokerSpec, host: str, port: int) -> MqttEndpoint:
        tls = spec.tls
        return cls(
            host=host,
            port=port,
            username=spec.username,
            password=spec.password,
            tls_ca_file=str(tls.ca_file) if tls and tls.ca_file else None,
            tls_cert_file=str(tls.cert_file) if tls and tls.cert_file else None,
            tls_key_file=str(tls.key_file) if tls and tls.key_file else None,
            tls_enabled=spec.uses_tls,
            tls_verify_certificate=not (tls and tls.insecure),
            tls_check_hostname=not (tls and tls.insecure),
        )

    def via(self, host: str, port: int) -> MqttEndpoint:
        """The same broker reached through another address (a channel link's proxy).

        TLS still runs end to end through the proxy and the certificate is still verified against
        the CA, but its host name cannot match the proxy's address, so that one check is off.
        """
        return replace(self, host=host, port=port, tls_check_hostname=False)

    def client(self, identifier: str, keepalive: int = 60, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
        """An aiomqtt client for this endpoint (use as `async with`)."""
        tls_params = None
        if self.tls_enabled:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=self.tls_ca_file,
                certfile=self.tls_cert_file,
                keyfile=self.tls_key_file,
                cert_reqs=ssl.CERT_REQUIRED if self.tls_verify_certificate else ssl.CERT_NONE,
            )
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            keepalive=keepalive,
            will=will,
            timeout=MQTT_TIMEOUT_S,
            clean_session=True,
            tls_params=tls_params,
            tls_insecure=(not self.tls_check_hostname) if self.tls_enabled else None,
        )
