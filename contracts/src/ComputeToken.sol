// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title ComputeToken: the ERC20 of development chains.
/// @notice Production deployments use an existing ERC20 (such as MOR) instead;
///         the marketplace takes the token's address at deployment.
contract ComputeToken is ERC20, Ownable {
    constructor(address owner) ERC20("Compute", "CMPT") Ownable(owner) {}

    /// @notice Dev chains only: the deployer funds test accounts.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
