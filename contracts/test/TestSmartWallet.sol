// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title TestSmartWallet (test fixture, never deployed outside tests)
/// @notice A minimal contract wallet for the tests: `threshold` of its owners' ECDSA signatures over the
///         hash it is asked about make an ERC-1271 signature. One owner signs 65 bytes (r, s, v); more sign
///         `65 * threshold` bytes, the signers' addresses in strictly ascending order (no owner counted twice).
/// @dev The owners sign the hash itself (for EIP-3009 the token's EIP-712 digest, which names the wallet as
///      `from`, so a signature cannot be replayed for another wallet). Production wallets differ (Safe,
///      Coinbase Smart Wallet, ...), but they all answer the same `isValidSignature`.
contract TestSmartWallet {
    bytes4 private constant _MAGIC_VALUE = 0x1626ba7e; // isValidSignature(bytes32,bytes)
    bytes4 private constant _INVALID = 0xffffffff;
    uint256 private constant _HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    mapping(address => bool) public isOwner;
    uint256 public immutable threshold;

    constructor(address[] memory owners, uint256 threshold_) {
        require(threshold_ > 0 && threshold_ <= owners.length, "TestSmartWallet: bad threshold");
        for (uint256 i = 0; i < owners.length; i++) {
            require(owners[i] != address(0) && !isOwner[owners[i]], "TestSmartWallet: bad owner");
            isOwner[owners[i]] = true;
        }
        threshold = threshold_;
    }

    /// @notice ERC-1271: the magic value when `threshold` distinct owners signed `hash`, else 0xffffffff.
    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        if (signature.length != 65 * threshold) return _INVALID;
        address last = address(0);
        for (uint256 i = 0; i < threshold; i++) {
            bytes32 r = bytes32(signature[65 * i:65 * i + 32]);
            bytes32 s = bytes32(signature[65 * i + 32:65 * i + 64]);
            uint8 v = uint8(signature[65 * i + 64]);
            if (uint256(s) > _HALF_ORDER || (v != 27 && v != 28)) return _INVALID;
            address signer = ecrecover(hash, v, r, s);
            if (signer <= last || !isOwner[signer]) return _INVALID;
            last = signer;
        }
        return _MAGIC_VALUE;
    }
}

/// @title TestSmartWalletFactory (test fixture)
/// @notice Deploys TestSmartWallets at CREATE2 addresses known before deployment, as ERC-4337 factories
///         do; an ERC-6492 signature names this factory and the `createWallet` call data.
contract TestSmartWalletFactory {
    event WalletCreated(address wallet);

    function walletAddress(address[] calldata owners, uint256 threshold, bytes32 salt) public view returns (address) {
        bytes32 codeHash = keccak256(abi.encodePacked(type(TestSmartWallet).creationCode, abi.encode(owners, threshold)));
        return address(uint160(uint256(keccak256(abi.encodePacked(bytes1(0xff), address(this), salt, codeHash)))));
    }

    /// @notice Deploys the wallet, or returns it when it exists already (a replayed deployment is harmless).
    function createWallet(address[] calldata owners, uint256 threshold, bytes32 salt) external returns (address) {
        address wallet = walletAddress(owners, threshold, salt);
        if (wallet.code.length == 0) {
            new TestSmartWallet{salt: salt}(owners, threshold);
            emit WalletCreated(wallet);
        }
        return wallet;
    }
}
