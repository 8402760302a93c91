"""
An enrollment that checked out, written: the ssldir and puppet.conf, and for a master its
puppetserver's files, all in one all-or-nothing :class:`~puppetha.instance.ssldir.Changes`.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization

from puppetha.enc.launcher import compile_script
from puppetha.instance.answer import Enrollment
from puppetha.instance.failures import LocalError, WriteFailed
from puppetha.instance.options import DEFAULT_ENC_SCRIPT, Options
from puppetha.instance.puppetserver import (
    MasterMaterial,
    MasterSettings,
    PuppetserverLayout,
    master_config_files,
    server_settings,
)
from puppetha.instance.ssldir import (
    PUBLIC_FILE_MODE,
    AlreadyEnrolled,
    Changes,
    PuppetCredentials,
    write_puppet_conf_sections,
    write_ssldir,
)
from puppetha.instance.transport import describe
from puppetha.pki.keys import PrivateKey, private_key_pem

#: Where a master keeps its own intermediate CA certificate, under ``certs/``.
MASTER_CA_FILE = "master-ca.pem"


#: Puppet's own default (for agents that know the setting, from Puppet 7.28 and 8): the CA
#: bundle changes only when a CA is added.
CA_REFRESH_INTERVAL = "1d"


def puppet_settings(options: Options, enrollment: Enrollment) -> dict[str, str]:
    return {
        "certname": enrollment.certname,
        "server": enrollment.server.host,
        "serverport": str(enrollment.server.port),
        "ssldir": str(options.ssldir.absolute()),
        # Puppet refreshes its CRLs (and, from 7.28, its CA bundle) from the CA API; the front
        # serves those two paths and nothing else of it (docs/front.md).  Without these the
        # agent keeps the CRLs written here until they expire, and then stops.
        "ca_server": enrollment.server.host,
        "ca_port": str(enrollment.server.port),
        "crl_refresh_interval": options.crl_refresh_interval,
        "ca_refresh_interval": CA_REFRESH_INTERVAL,
    }


def credentials(enrollment: Enrollment, key: PrivateKey) -> PuppetCredentials:
    pem = serialization.Encoding.PEM
    extra = {}
    if enrollment.master_ca is not None:
        extra[MASTER_CA_FILE] = enrollment.master_ca.public_bytes(pem)
    return PuppetCredentials(
        certname=enrollment.certname,
        private_key=private_key_pem(key),
        public_key=key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
        certificate=enrollment.certificate.public_bytes(pem),
        ca_chain=b"".join(c.public_bytes(pem) for c in enrollment.ca_chain),
        crl_chain=b"".join(c.public_bytes(pem) for c in enrollment.crls),
        extra_certificates=extra,
    )


def master_layout(options: Options) -> PuppetserverLayout:
    """Debian's puppetserver, with the directories the options name."""
    confdir = options.puppetserver_dir.absolute()
    return attrs.evolve(
        PuppetserverLayout.debian(),
        conf_d=str(confdir / "conf.d"),
        services_d=str(confdir / "services.d"),
        confdir=str(options.puppet_conf.absolute().parent),
        ssldir=str(options.ssldir.absolute()),
    )


def master_material(enrollment: Enrollment, key: PrivateKey) -> MasterMaterial:
    if enrollment.lb_ca is None or enrollment.lb_crl is None:
        raise LocalError("a master's enrollment must carry the lb CA")
    pem = serialization.Encoding.PEM
    return MasterMaterial(
        certname=enrollment.certname,
        certificate_pem=enrollment.certificate.public_bytes(pem).decode("ascii"),
        private_key_pem=private_key_pem(key).decode("ascii"),
        ca_chain_pem=b"".join(c.public_bytes(pem) for c in enrollment.ca_chain).decode("ascii"),
        crl_chain_pem=b"".join(c.public_bytes(pem) for c in enrollment.crls).decode("ascii"),
        lb_ca_pem=enrollment.lb_ca.public_bytes(pem).decode("ascii"),
        lb_crl_pem=enrollment.lb_crl.public_bytes(pem).decode("ascii"),
    )


def install(
    options: Options, enrollment: Enrollment, key: PrivateKey, listen_address: str | None = None
) -> None:
    """
    The ssldir and puppet.conf, and for a master puppetserver's files too: all or nothing.
    ``listen_address``: a master's puppetserver's (``--listen-address`` wins).
    """
    try:
        with Changes() as changes:
            owned = credentials(enrollment, key)
            sections: dict[str, dict[str, str]] = {options.section: puppet_settings(options, enrollment)}
            config: dict[str, str] = {}
            if enrollment.role == "master":
                address = options.listen_address or listen_address
                if not address:
                    raise LocalError("no address for puppetserver; name one with --listen-address")
                layout = master_layout(options)
                material = master_material(enrollment, key)
                settings = MasterSettings(
                    listen_address=address, listen_port=options.listen_port,
                    enc_command=options.enc_script, enc_socket=options.enc_socket,
                )  # fmt: skip
                config = master_config_files(layout, material, settings)
                if options.enc_script == DEFAULT_ENC_SCRIPT:
                    compile_script()  # the default command runs the script's bytecode
                owned = attrs.evolve(owned, extra_files={
                    Path(layout.lb_ca).name: material.lb_ca_pem.encode("ascii"),
                    Path(layout.lb_crl).name: material.lb_crl_pem.encode("ascii"),
                })  # fmt: skip
                sections.setdefault("server", {}).update(server_settings(settings))
            write_ssldir(changes, options.ssldir, owned, force=options.force)
            for path, text in sorted(config.items()):
                changes.stage_file(Path(path), text.encode("utf-8"), PUBLIC_FILE_MODE)
            write_puppet_conf_sections(changes, options.puppet_conf, sections)
            changes.commit()
    except AlreadyEnrolled as e:
        raise LocalError(str(e)) from None
    except OSError as e:
        raise WriteFailed(f"cannot write the puppet files: {describe(e)}") from None
    except ValueError as e:
        raise LocalError(f"cannot write the puppet files: {describe(e)}") from None
