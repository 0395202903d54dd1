// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title PaymentRouter
/// @notice Forwards an invoice payment, in an ERC-20 token or the native coin,
///         straight from the payer to the recipient and emits one event that
///         ties the payment to an invoice. It never holds funds.
/// @dev Tokens are moved with a low-level `transferFrom` call so that tokens
///      which return nothing (USDT-style) are accepted as well as tokens that
///      return `true`.
contract PaymentRouter {
    event PaymentReceived(
        bytes32 indexed invoiceId,
        bytes32 indexed paymentId,
        address indexed payer,
        address token,
        address recipient,
        uint256 amount
    );

    error ZeroAmount();
    error ZeroRecipient();
    error UnexpectedValue(uint256 sent);
    error WrongValue(uint256 sent, uint256 expected);
    error NotAContract(address token);
    error TokenTransferFailed(address token);
    error NativeTransferFailed(address recipient);

    /// @notice Pay `amount` of `token` (or the native coin when `token` is the
    ///         zero address) from the caller to `recipient`.
    function pay(
        bytes32 invoiceId,
        bytes32 paymentId,
        address token,
        address recipient,
        uint256 amount
    ) external payable {
        if (recipient == address(0)) revert ZeroRecipient();
        if (amount == 0) revert ZeroAmount();

        if (token == address(0)) {
            if (msg.value != amount) revert WrongValue(msg.value, amount);
            (bool sent, ) = recipient.call{value: amount}("");
            if (!sent) revert NativeTransferFailed(recipient);
        } else {
            if (msg.value != 0) revert UnexpectedValue(msg.value);
            // A call to an address without code succeeds with empty return data,
            // which would otherwise be taken for a USDT-style success.
            if (token.code.length == 0) revert NotAContract(token);
            (bool ok, bytes memory ret) = token.call(
                abi.encodeWithSelector(0x23b872dd, msg.sender, recipient, amount) // transferFrom(address,address,uint256)
            );
            if (!ok) {
                // Bubble up the token's own reason (e.g. insufficient allowance).
                if (ret.length == 0) revert TokenTransferFailed(token);
                assembly ("memory-safe") {
                    revert(add(ret, 32), mload(ret))
                }
            }
            // Accept no return data (USDT-style) or a return value of `true`.
            if (ret.length != 0 && (ret.length < 32 || abi.decode(ret, (uint256)) != 1)) {
                revert TokenTransferFailed(token);
            }
        }

        emit PaymentReceived(invoiceId, paymentId, msg.sender, token, recipient, amount);
    }
}
