from pathlib import Path

from setuptools import setup

setup(
    name="puppetha",
    version="0.1.0",
    description="Self-enrolling, highly available Puppet fleets on AWS",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # The same in debian/control's Maintainer and debian/changelog (tests/test_deb.py checks).
    author="The puppetha maintainers",
    author_email="maintainers@puppetha.invalid",
    license="Apache-2.0",
    python_requires=">=3.11",
    # twisted.plugins is listed so that `twistd puppetha` finds our ServiceMaker.
    packages=[
        "puppetha",
        "puppetha.aws",
        "puppetha.enc",
        "puppetha.enroll",
        "puppetha.ha",
        "puppetha.instance",
        "puppetha.metrics",
        "puppetha.pki",
        "puppetha.store",
        "puppetha.testing",
        "twisted.plugins",
    ],
    package_data={
        "twisted": ["plugins/puppetha_plugin.py"],
        # AWS's identity-signing certificates, trusted when [aws] identity_certs is unset.
        "puppetha.aws": ["identity_certs/*.pem", "identity_certs/*.ini"],
    },
    install_requires=[
        "twisted[tls]>=24.7",
        "attrs>=23.1",
        "cryptography>=42",
        "asn1crypto>=1.5",
        "boto3>=1.34",
        "pyyaml>=6",
        "treq>=23.11",
        "klein>=24.8",
        # The metrics endpoint's text format, rendered from a registry of the daemon's own.
        "prometheus-client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-cov>=5",
            "hypothesis>=6",
            "moto[server,ec2,dynamodb,kms]>=5.0",
            "ruff>=0.6",
            "mypy>=1.11",
            "mypy-zope>=1.0",
            "types-PyYAML",
            # boto3's and botocore's own annotations; per-service stubs are not needed (clients are Any).
            "boto3-stubs",
            "botocore-stubs",
        ],
    },
    entry_points={
        "console_scripts": [
            "puppetha = puppetha.cli:main",
            "puppetha-enroll = puppetha.instance.enroll:main",
            "puppetha-enc = puppetha.enc.script:main",
        ],
    },
)
