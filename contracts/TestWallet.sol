// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @notice The one ERC-20 call TestWallet makes.
interface IERC20Transfer {
    function transfer(address to, uint256 value) external returns (bool);
}

/// @title TestWallet
/// @notice A minimal smart-contract wallet for tests and local chains: it pays the
///         native coin from inside a contract call, the way a Safe or an exchange hot
///         wallet does, so the coin arrives as an internal transfer that only a node's
///         tracers show (no log, and not the transaction's own value).
/// @dev Every shape the watcher's trace decoders must tell apart has a function here:
///      plain inner CALLs, a reverted inner CALL inside a successful transaction, a
///      DELEGATECALL that carries the caller's msg.value without moving it, and a
///      CREATE with value whose new contract SELFDESTRUCTs to the recipient. It also pays
///      several ERC-20 transfers in one transaction, as an exchange's batch payout does.
contract TestWallet {
    error TransferFailed(address to);
    error LengthMismatch();
    error Reverted();

    receive() external payable {}

    /// @notice Pay `amounts[i]` of `token` from this wallet's own balance to `to[i]`, in
    ///         order, in one transaction: one Transfer log each. Anyone may call it (tests only).
    function transferTokens(address token, address[] calldata to, uint256[] calldata amounts) external {
        if (to.length != amounts.length) revert LengthMismatch();
        for (uint256 i = 0; i < to.length; i++) {
            if (!IERC20Transfer(token).transfer(to[i], amounts[i])) revert TransferFailed(to[i]);
        }
    }

    /// @notice Send msg.value on to `to`; reverts if `to` refuses it.
    function forward(address payable to) external payable {
        _send(to, msg.value);
    }

    /// @notice Send `amounts[i]` to `to[i]` in order, from msg.value and the balance;
    ///         the first refusal reverts everything, earlier sends included.
    function forwardMany(address payable[] calldata to, uint256[] calldata amounts) external payable {
        if (to.length != amounts.length) revert LengthMismatch();
        for (uint256 i = 0; i < to.length; i++) {
            _send(to[i], amounts[i]);
        }
    }

    /// @notice Send msg.value to `to` inside an inner call that then reverts, and carry
    ///         on: the transaction succeeds, the wallet keeps the coin, `to` gets nothing.
    function forwardIgnoringFailure(address payable to) external payable {
        try this.sendAndRevert{value: msg.value}(to) {} catch {}
    }

    /// @notice Send msg.value to `to`, then revert (undoing the send).
    function sendAndRevert(address payable to) external payable {
        _send(to, msg.value);
        revert Reverted();
    }

    /// @notice `forward` run through a DELEGATECALL into this contract: the delegate
    ///         frame sees msg.value but moves nothing; only its inner CALL pays `to`.
    function forwardByDelegatecall(address payable to) external payable {
        (bool ok, ) = address(this).delegatecall(abi.encodeCall(this.forward, (to)));
        if (!ok) revert TransferFailed(to);
    }

    /// @notice Pay msg.value to `to` by creating a contract with it that selfdestructs
    ///         to `to` in its constructor (a CREATE with value, then a SELFDESTRUCT).
    function forwardBySelfdestruct(address payable to) external payable {
        new Sweeper{value: msg.value}(to);
    }

    function _send(address payable to, uint256 amount) private {
        (bool ok, ) = to.call{value: amount}("");
        if (!ok) revert TransferFailed(to);
    }
}

/// @notice Created with value by TestWallet.forwardBySelfdestruct; hands it all to `to`.
contract Sweeper {
    constructor(address payable to) payable {
        selfdestruct(to);
    }
}
