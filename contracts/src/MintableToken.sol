// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title MintableToken
/// @notice The ERC-20 that buyers pay for. Only configured minters (the service's minter wallet) mint.
/// @dev `mintOnce` is the idempotent mint: each `mintId` mints at most once, ever (like EIP-3009's
///      authorization nonces for payments), so a mint sent twice - a retry, a re-broadcast after a crash,
///      a second worker - cannot mint twice. The plain `mint` stays for callers that do not use ids.
contract MintableToken {
    string public name;
    string public symbol;
    uint8 public constant decimals = 18;

    uint256 public totalSupply;
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;

    address public owner;
    mapping(address => bool) public isMinter;
    mapping(bytes32 => bool) private _usedMintIds;

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event MinterConfigured(address indexed minter, bool allowed);
    event MintIdUsed(bytes32 indexed mintId, address indexed to, uint256 value);

    constructor(string memory name_, string memory symbol_) {
        name = name_;
        symbol = symbol_;
        owner = msg.sender;
        isMinter[msg.sender] = true;
        emit MinterConfigured(msg.sender, true);
    }

    function configureMinter(address minter, bool allowed) external {
        require(msg.sender == owner, "MintableToken: caller is not the owner");
        isMinter[minter] = allowed;
        emit MinterConfigured(minter, allowed);
    }

    function mint(address to, uint256 value) external {
        require(isMinter[msg.sender], "MintableToken: caller is not a minter");
        _mint(to, value);
    }

    /// @notice Mint `value` to `to` unless `mintId` has minted before; reverts if it has.
    function mintOnce(address to, uint256 value, bytes32 mintId) external {
        require(isMinter[msg.sender], "MintableToken: caller is not a minter");
        require(!_usedMintIds[mintId], "MintableToken: mint id already used");
        _usedMintIds[mintId] = true;
        _mint(to, value);
        emit MintIdUsed(mintId, to, value);
    }

    /// @notice Whether `mintId` has already minted (through `mintOnce`).
    function mintIdUsed(bytes32 mintId) external view returns (bool) {
        return _usedMintIds[mintId];
    }

    function transfer(address to, uint256 value) external returns (bool) {
        _transfer(msg.sender, to, value);
        return true;
    }

    function approve(address spender, uint256 value) external returns (bool) {
        allowance[msg.sender][spender] = value;
        emit Approval(msg.sender, spender, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        require(allowed >= value, "MintableToken: insufficient allowance");
        if (allowed != type(uint256).max) {
            allowance[from][msg.sender] = allowed - value;
        }
        _transfer(from, to, value);
        return true;
    }

    function _mint(address to, uint256 value) private {
        require(to != address(0), "MintableToken: mint to the zero address");
        totalSupply += value;
        balanceOf[to] += value;
        emit Transfer(address(0), to, value);
    }

    function _transfer(address from, address to, uint256 value) private {
        require(to != address(0), "MintableToken: transfer to the zero address");
        uint256 balance = balanceOf[from];
        require(balance >= value, "MintableToken: transfer amount exceeds balance");
        unchecked {
            balanceOf[from] = balance - value;
        }
        balanceOf[to] += value;
        emit Transfer(from, to, value);
    }
}
