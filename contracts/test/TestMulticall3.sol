// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title TestMulticall3 (test fixture)
/// @notice Multicall3's `tryAggregate`, the one function the x402 verifier uses (to simulate an ERC-6492
///         factory call followed by the transfer). Public chains have Multicall3 at
///         0xcA11bde05977b3631167028862bE2a173976CA11; tests put this code there on anvil, which has none.
contract TestMulticall3 {
    struct Call {
        address target;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    function tryAggregate(bool requireSuccess, Call[] calldata calls) external payable returns (Result[] memory results) {
        results = new Result[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            (bool success, bytes memory returnData) = calls[i].target.call(calls[i].callData);
            require(success || !requireSuccess, "Multicall3: call failed");
            results[i] = Result(success, returnData);
        }
    }
}
